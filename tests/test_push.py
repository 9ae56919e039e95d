"""Server-to-server push: each server sends its output straight to the next server's session.

Tokens equal local greedy generation (uncompressed wire) with 2 and 3 servers, and the servers'
own counts show that steps really travelled server to server (or, with push=False, never did); a
server killed mid-generation still gives exactly the undisturbed tokens; a push is accepted only from
a peer that the session's owner named, with the session's id, and within the server's limits.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from swarm.client.span_session import SpanSession
from swarm.client.wire_codecs import WireCodecs
from swarm.transport import call_unary, start_p2p
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import encode
from swarm.wire.rpc import RPC_INFO, RPC_PUSH
from tests.conftest import served_counts
from tests.test_failover import AtStep, kill_machine, peer_id_of

pytestmark = pytest.mark.timeout(300)

NEW_TOKENS = 24
PROMPT = torch.tensor([[5, 17, 42, 99, 7, 123, 64, 8]])
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def expected_tokens(tiny_models) -> torch.Tensor:
    local = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    return local.generate(PROMPT, **GREEDY)


def pushed_steps(model: torch.nn.Module, before: dict[str, pb.RequestCounts]) -> dict[str, int]:
    """Steps pushed into each server since `before`, by peer id."""
    return {peer: counts.pushed_steps - before[peer].pushed_steps for peer, counts in served_counts(model).items()}


def served_by(model: torch.nn.Module, peer: str) -> pb.RequestCounts:
    client = model.swarm_client
    return run_sync(call_unary(client.p2p, peer, RPC_INFO, pb.InfoRequest(), pb.InfoResponse, 10.0)).served


def first_server(model: torch.nn.Module) -> str:
    (peer,) = run_sync(model.swarm_client.fetch_blocks())[0]
    return peer


@pytest.mark.parametrize("ranges", [["0:3", "3:6"], ["0:2", "2:4", "4:6"]], ids=["2 servers", "3 servers"])
def test_push_gives_the_tokens_of_local_greedy(tiny_models, expected_tokens, local_swarm, ranges):
    path = tiny_models["llama"]
    local_swarm.start_dht()
    local_swarm.start_servers(path, ranges, "--num-threads", "1")
    for push in (True, False):
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                                wire_codec="none", push=push)
        try:
            before = served_counts(model)
            assert torch.equal(model.generate(PROMPT, **GREEDY), expected_tokens)
            pushed = pushed_steps(model, before)
            first = first_server(model)
            # The prompt and every new token but the last went through the chain: one step each.
            assert pushed == {peer: NEW_TOKENS if push and peer != first else 0 for peer in pushed}, (push, pushed)
        finally:
            model.swarm_client.shutdown()


def test_killing_a_pushing_server_mid_generation_keeps_the_tokens(tiny_models, expected_tokens, local_swarm):
    """The middle of three hops dies (SIGKILL) mid-generation: its blocks are replayed on a replica, the
    last server is told to take pushes from it, and the tokens are those of an undisturbed run."""
    path = tiny_models["llama"]
    local_swarm.start_dht()
    servers = local_swarm.start_servers(path, ["0:2", "2:4", "2:4", "4:6"], "--num-threads", "1")
    by_peer = {peer_id_of(server): server for server in servers}
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers, wire_codec="none")
    try:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            victim_peer, last_peer = session.route[1].peer_id, session.route[-1].peer_id
            before = served_by(model, last_peer).pushed_steps
            clock = AtStep(NEW_TOKENS // 2, lambda: kill_machine(by_peer[victim_peer]))
            output = model.generate(PROMPT, stopping_criteria=[clock], **GREEDY)
            assert victim_peer not in {hop.peer_id for hop in session.route}
            assert session.route[-1].peer_id == last_peer  # only the dead hop was replaced
        assert torch.equal(output, expected_tokens)
        # Pushes reached the last server before the failure and, from the replacement, after it; only the
        # step that found the dead server (and maybe the one before it) went on through the client.
        assert served_by(model, last_peer).pushed_steps - before >= NEW_TOKENS - 2
    finally:
        model.swarm_client.shutdown()


def test_push_is_refused_unless_the_owner_named_the_pusher(tiny_models, local_swarm):
    path = tiny_models["llama"]
    peers = local_swarm.start_dht()
    server_peer = peer_id_of(local_swarm.start_server(path, "0:6", "--num-threads", "1"))
    hidden = encode(torch.randn(1, 2, 64))  # (batch, new tokens, hidden) of the tiny model

    async def scenario() -> dict[str, pb.PushResponse | list[float]]:
        owner, named, stranger = [await start_p2p(peers, ["/ip4/127.0.0.1/tcp/0"]) for _ in range(3)]
        try:
            span = SpanSession(owner, server_peer, 0, 6, max_length=16, batch_size=1, codecs=WireCodecs("none", "none"),
                               pushers=[named.peer_id.to_base58()])
            await span.open()

            async def push(p2p, session_id: bytes, tensor: pb.Tensor = hidden) -> pb.PushResponse:  # noqa: ANN001
                request = pb.PushRequest(session_id=session_id, step=pb.InferenceStep(hidden_states=tensor, step_id=7))
                return await call_unary(p2p, server_peer, RPC_PUSH, request, pb.PushResponse, 10.0)

            results: dict[str, pb.PushResponse | list[float]] = {
                "stranger": await push(stranger, span.session_id),
                "owner": await push(owner, span.session_id),  # the owner steps through its own stream, not by push
                "guessed id": await push(named, os.urandom(16)),
                "too large": await push(named, span.session_id, pb.Tensor(shape=[1, 1 << 20, 64], dtype="float32", codec="none")),
            }
            reply = span.expect(7)
            results["named"] = await push(named, span.session_id)
            results["output"] = span.output_of(await span.reply(reply), (1, 2, 64)).flatten().tolist()
            await span.close()
            return results
        finally:
            for p2p in (owner, named, stranger):
                await p2p.shutdown()

    results = run_sync(scenario())
    for who in ("stranger", "owner", "guessed id"):
        assert results[who].error.message == "no session here accepts pushes from this peer under this id", who
    assert "exceed the limit" in results["too large"].error.message
    assert not results["named"].HasField("error")
    assert len(results["output"]) == 2 * 64  # the pushed step ran in the owner's session and came back to it
