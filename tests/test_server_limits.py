"""Per-peer limits and session lifetime: a flooding client is refused with errors naming the limit,
while another client on the same server keeps getting exact tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from swarm.client.remote_calls import forward_async
from swarm.client.local_processes import LocalSwarm
from swarm.client.span_session import SpanSession
from swarm.client.swarm_client import SwarmClient
from swarm.client.wire_codecs import WireCodecs
from swarm.dht import fetch_block_records
from swarm.errors import InvalidRequest, LimitExceeded
from swarm.model_id import model_dht_prefix
from swarm.server.peer_limits import PeerGovernor, PeerLimits
from swarm.transport import open_stream
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.frames import read_message
from swarm.wire.rpc import RPC_FORWARD

NUM_BLOCKS = 6
SESSIONS_PER_PEER = 2
LIFETIME = 6.0  # seconds
REQUESTS_PER_PEER = 2
REQUEST_TIMEOUT = 2.0  # seconds


def test_governor_counts_each_peer_on_its_own():
    governor = PeerGovernor(PeerLimits(max_sessions_per_peer=2, max_requests_per_peer=1))
    with governor.session("a"), governor.session("a"):
        with pytest.raises(LimitExceeded, match=r"already has 2 inference sessions on this server \(limit 2, --max-sessions-per-peer\)"):
            with governor.session("a"):
                pass
        with governor.session("b"), governor.request("a"):
            assert governor.held_by("a") == (2, 1)
            with pytest.raises(LimitExceeded, match="--max-requests-per-peer"):
                with governor.request("a"):
                    pass
    assert governor.held_by("a") == (0, 0)
    with governor.session("a"):  # released: admitted again
        pass


@pytest.fixture(scope="module")
def limited_server(tiny_models) -> Iterator[tuple[LocalSwarm, object]]:
    path = tiny_models["llama"]
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_server(path, "0:6", "--num-threads", "1", "--max-sessions-per-peer", str(SESSIONS_PER_PEER),
                           "--max-session-lifetime", str(LIFETIME), "--max-requests-per-peer", str(REQUESTS_PER_PEER),
                           "--request-timeout", str(REQUEST_TIMEOUT))
        yield swarm, path
    finally:
        swarm.stop()


@pytest.fixture
def flooder(limited_server) -> Iterator[tuple[SwarmClient, str]]:
    """Another peer that talks to the server directly: (client, server peer id)."""
    swarm, path = limited_server
    client = SwarmClient(swarm.initial_peers, model_dht_prefix(path), NUM_BLOCKS, codecs=WireCodecs("none", "none"))
    client.start()
    try:
        (peer,) = fetch_block_records(client.dht, client.dht_prefix, NUM_BLOCKS)[0]
        yield client, peer
    finally:
        client.shutdown()


def open_session(client: SwarmClient, peer: str) -> SpanSession:
    session = SpanSession(client.p2p, peer, 0, NUM_BLOCKS, 16, 1, client.codecs)
    run_sync(session.open())
    return session


@pytest.mark.timeout(240)
def test_a_peer_over_its_session_limit_is_refused_while_others_are_served(limited_server, flooder):
    swarm, path = limited_server
    client, peer = flooder
    held = [open_session(client, peer) for _ in range(SESSIONS_PER_PEER)]
    try:
        began = time.monotonic()
        with pytest.raises(InvalidRequest, match=f"limit {SESSIONS_PER_PEER}, --max-sessions-per-peer"):
            open_session(client, peer)
        assert time.monotonic() - began < 5

        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, wire_codec="none")
        try:
            prompt = torch.tensor([[5, 9, 17, 33]])
            produced = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
            assert torch.equal(produced, local.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None))
        finally:
            model.swarm_client.shutdown()
    finally:
        for session in held:
            run_sync(session.close())
    open_session_again = open_session(client, peer)  # the closed sessions no longer count
    run_sync(open_session_again.close())


@pytest.mark.timeout(120)
def test_a_session_past_its_lifetime_is_closed_with_a_clear_error(flooder):
    client, peer = flooder
    session = open_session(client, peer)
    try:
        hidden = torch.randn(1, 2, 64)
        run_sync(session.step(hidden, 0))
        time.sleep(LIFETIME + 0.5)
        with pytest.raises(InvalidRequest, match=rf"maximum session lifetime of {LIFETIME:.0f} s \(--max-session-lifetime\)"):
            run_sync(session.step(hidden, 2))
    finally:
        run_sync(session.close())


def stream_that_never_finishes() -> AsyncIterator[pb.Frame]:
    async def frames() -> AsyncIterator[pb.Frame]:
        yield pb.Frame(payload=b"\x0a\x04", last=False)  # the start of a message, and then nothing
        await asyncio.sleep(3600)
    return frames()


@pytest.mark.timeout(120)
def test_a_stream_that_never_finishes_is_cut_off(flooder):
    client, peer = flooder

    async def send() -> pb.ForwardResponse | None:
        replies = await open_stream(client.p2p, peer, RPC_FORWARD, stream_that_never_finishes(), 10.0)
        return await asyncio.wait_for(read_message(replies, pb.ForwardResponse), 30.0)

    began = time.monotonic()
    reply = run_sync(send())
    assert reply is not None and reply.HasField("error"), reply
    assert f"did not arrive within this server's {REQUEST_TIMEOUT:g} s (--request-timeout)" in reply.error.message
    assert REQUEST_TIMEOUT - 0.5 < time.monotonic() - began < REQUEST_TIMEOUT + 5


@pytest.mark.timeout(240)
def test_a_request_flood_is_refused_beyond_the_limit_while_others_are_served(limited_server, flooder):
    """One peer fires 40 forwards at once: at most REQUESTS_PER_PEER run, the rest are refused at once,
    naming the limit; another client's generation stays exact meanwhile."""
    swarm, path = limited_server
    client, peer = flooder
    hidden = torch.randn(1, 8, 64)

    async def flood() -> list[object]:
        async def one() -> object:
            try:
                return await forward_async(client, hidden, 0, NUM_BLOCKS)
            except InvalidRequest as e:
                return e
        return await asyncio.gather(*(one() for _ in range(40)))

    results = run_sync(flood())
    refused = [r for r in results if isinstance(r, InvalidRequest)]
    assert refused and all(f"limit {REQUESTS_PER_PEER}, --max-requests-per-peer" in str(r) for r in refused)
    assert len(refused) < len(results)  # some got through

    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, wire_codec="none")
    try:
        prompt = torch.tensor([[11, 12, 13]])
        produced = model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None)
        assert torch.equal(produced, local.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None))
    finally:
        model.swarm_client.shutdown()
