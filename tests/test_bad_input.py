"""Bad input on the wire gets an error naming the problem, and the server keeps serving everyone.

One real server (tiny llama, blocks 0:3 of 6, small limits) takes every malformed request below,
built with the client's own pieces or by hand where the client could not produce it. After each
one the same server still gives a good forward and a good inference session equal to local
transformers; an inference session of another client stays open on it throughout and stays right.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from swarm.client.local_processes import LocalSwarm
from swarm.client.span_session import SpanSession
from swarm.client.swarm_client import SwarmClient
from swarm.client.wire_codecs import WireCodecs
from swarm.dht import fetch_block_records
from swarm.errors import CacheFull, InvalidRequest, MissingBlocksError, RemoteError, SwarmError
from swarm.limits import CACHE_WAIT_TIMEOUT, MAX_FRAME_BYTES
from swarm.model_id import model_dht_prefix
from swarm.transport import call_unary, open_stream, raise_for_error
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import decode, encode
from swarm.wire.frames import read_message, to_frames
from swarm.wire.rpc import RPC_BACKWARD, RPC_FORWARD, RPC_INFERENCE, RPC_INFO

pytestmark = pytest.mark.timeout(300)

HIDDEN = 64  # the tiny llama's hidden size
NUM_BLOCKS = 6
RAW = WireCodecs("none", "none")  # exact values on the wire, so results compare with local ones
CACHE_TOKENS = 300
KV_BYTES_PER_TOKEN = 2 * 2 * 16 * 4 * 3  # keys and values x kv heads x head_dim x float32 x blocks 0:3
SERVER_FLAGS = ("--num-threads", "1", "--max-batch-size", "4", "--max-tokens-per-request", "64",
                "--max-session-length", "128", "--max-lora-rank", "4", "--attn-cache-tokens", str(CACHE_TOKENS))
REPLY_TIMEOUT = 30.0  # seconds: every error reply below must come well within this


@dataclasses.dataclass
class Served:
    """A client connected to the one server under test, and local transformers for reference."""

    client: SwarmClient
    peer: str
    model_path: Path
    initial_peers: list[str]
    local: Callable[[torch.Tensor], torch.Tensor]  # (batch, seq, hidden) through blocks 0:3, locally
    server_log: Callable[[], str]


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path]) -> Iterator[Served]:
    path = tiny_models["llama"]
    swarm = LocalSwarm()
    client = None
    try:
        swarm.start_dht()
        server = swarm.start_server(path, "0:3", *SERVER_FLAGS)
        client = SwarmClient(swarm.initial_peers, model_dht_prefix(path), NUM_BLOCKS, codecs=RAW)
        client.start()
        (peer,) = fetch_block_records(client.dht, client.dht_prefix, NUM_BLOCKS)[0]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        def local(hidden: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # hidden_states[3]: the output of blocks 0..2, before the final norm
                return model.model(inputs_embeds=hidden, output_hidden_states=True).hidden_states[3]

        yield Served(client, peer, path, swarm.initial_peers, local, server.output)
    finally:
        if client is not None:
            client.shutdown()
        swarm.stop()


# ---- talking to the server with hand-built messages -------------------------------------------


async def _frames(items: list[pb.Frame | object]) -> AsyncIterator[pb.Frame]:
    """Frames as given, and messages cut into frames as a client would send them."""
    for item in items:
        if isinstance(item, pb.Frame):
            yield item
        else:
            for frame in to_frames(item):
                yield frame


def exchange(served: Served, rpc: str, items: list, response_type: type) -> list:
    """Send `items` on one stream of `rpc` and read every reply until the server closes it.

    A stream that ends with no reply at all is sent once more, as the client does (`call_stream` in
    swarm/transport.py): hivemind's daemons now and then drop a reply the server did send.
    """

    async def go() -> list:
        replies = await open_stream(served.client.p2p, served.peer, rpc, _frames(items), REPLY_TIMEOUT)
        found = []
        while (reply := await asyncio.wait_for(read_message(replies, response_type), REPLY_TIMEOUT)) is not None:
            found.append(reply)
        return found

    return run_sync(go()) or run_sync(go())


def error_of(served: Served, rpc: str, items: list, response_type: type) -> SwarmError:
    """The error a client raises for the server's reply to `items` (which must be an error)."""
    *_, reply = exchange(served, rpc, items, response_type)
    assert reply.HasField("error"), f"expected an error reply, got {reply}"
    with pytest.raises(SwarmError) as raised:
        raise_for_error(served.peer, reply.error)
    return raised.value


def forward_request(hidden: pb.Tensor, span: tuple[int, int] = (0, 3), **fields: object) -> pb.ForwardRequest:
    return pb.ForwardRequest(span=pb.Span(start=span[0], end=span[1]), hidden_states=hidden, **fields)


def tensor_with(encoded_with: str = "none", **changes: object) -> pb.Tensor:
    """A random (1, 4, hidden) tensor encoded with `encoded_with`, then some fields of it changed."""
    message = encode(torch.randn(1, 4, HIDDEN), encoded_with)
    for name, value in changes.items():
        if name == "shape":
            del message.shape[:]
            message.shape.extend(value)
        else:
            setattr(message, name, value)
    return message


# ---- what a healthy server answers -------------------------------------------------------------

GOOD_INPUT = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(0))


def assert_still_serving(served: Served) -> None:
    """A good forward and a good inference session (prefill, then one token) equal local blocks 0:3,
    and no bad request so far made the server fail inside (it would log a traceback)."""
    expected = served.local(GOOD_INPUT)
    (reply,) = exchange(served, RPC_FORWARD, [forward_request(encode(GOOD_INPUT))], pb.ForwardResponse)
    assert not reply.HasField("error"), reply.error.message
    torch.testing.assert_close(decode(reply.hidden_states), expected, atol=1e-5, rtol=0)

    session = SpanSession(served.client.p2p, served.peer, 0, 3, 8, 2, RAW)
    run_sync(session.open())
    try:
        prefill = run_sync(session.step(GOOD_INPUT[:, :4], 0))
        last = run_sync(session.step(GOOD_INPUT[:, 4:], 4))
    finally:
        run_sync(session.close())
    torch.testing.assert_close(torch.cat([prefill, last], dim=1), expected, atol=1e-5, rtol=0)
    assert "Traceback" not in served.server_log(), served.server_log()


# ---- forward -----------------------------------------------------------------------------------

INT8_NAN_SCALES = tensor_with("int8", scales=b"\x00\x00\xc0\x7f" * 4)  # 256 values: 4 blocks of 64


@pytest.mark.parametrize(
    ("request_message", "error_type", "needle"),
    [
        pytest.param(forward_request(tensor_with(), (3, 6)), RemoteError,
                     "blocks 3:6 are not served here (this server holds 0:3)", id="blocks-not-held"),
        pytest.param(forward_request(tensor_with(), (2, 2)), InvalidRequest, "span 2:2 is empty", id="empty-span"),
        pytest.param(forward_request(encode(torch.randn(1, 4, 32))), InvalidRequest,
                     "must have shape (batch, seq, 64), got (1, 4, 32)", id="wrong-hidden-size"),
        pytest.param(forward_request(encode(torch.randn(4, HIDDEN))), InvalidRequest,
                     "must have shape (batch, seq, 64), got (4, 64)", id="not-3d"),
        pytest.param(forward_request(tensor_with(dtype="float64")), InvalidRequest,
                     "dtype 'float64' is not allowed (allowed: float32, bfloat16, float16)", id="dtype-not-allowed"),
        pytest.param(forward_request(tensor_with(dtype="fp33")), InvalidRequest, "dtype 'fp33' is not allowed",
                     id="unknown-dtype"),
        pytest.param(forward_request(pb.Tensor()), InvalidRequest, "must have shape (batch, seq, 64), got ()", id="no-tensor"),
        pytest.param(forward_request(tensor_with(shape=[1, 2**40, HIDDEN])), InvalidRequest,
                     "1099511627776 tokens in one request exceed the limit 64", id="huge-declared-shape"),
        pytest.param(forward_request(tensor_with(shape=[1, 5, HIDDEN])), InvalidRequest,
                     "float32 of shape (1, 5, 64) needs 1280 bytes, got 1024", id="data-shorter-than-shape"),
        pytest.param(forward_request(tensor_with(shape=[1, 3, HIDDEN])), InvalidRequest,
                     "needs 768 bytes, got 1024", id="data-longer-than-shape"),
        pytest.param(forward_request(tensor_with("fp16", data=b"\x00" * 7)), InvalidRequest,
                     "fp16 of shape (1, 4, 64) needs 512 bytes, got 7", id="fp16-data-length"),
        pytest.param(forward_request(tensor_with(codec="zip")), InvalidRequest, "unknown codec 'zip'", id="unknown-codec"),
        pytest.param(forward_request(INT8_NAN_SCALES), InvalidRequest, "int8 scales must be finite", id="int8-nan-scales"),
        pytest.param(forward_request(tensor_with("int8", block_size=32)), InvalidRequest,
                     "int8 block size 32 is not supported", id="int8-block-size"),
        pytest.param(forward_request(encode(torch.full((1, 4, HIDDEN), float("nan")))), InvalidRequest,
                     "hidden states contain NaN or Inf", id="nan"),
        pytest.param(forward_request(encode(torch.full((1, 4, HIDDEN), float("-inf")))), InvalidRequest,
                     "hidden states contain NaN or Inf", id="inf"),
        pytest.param(forward_request(encode(torch.randn(1, 65, HIDDEN))), InvalidRequest,
                     "65 tokens in one request exceed the limit 64", id="tokens-over-limit"),
        pytest.param(forward_request(encode(torch.randn(5, 2, HIDDEN))), InvalidRequest,
                     "batch 5 exceeds the limit 4", id="batch-over-limit"),
        pytest.param(forward_request(encode(torch.randn(2, 3, HIDDEN)), attention_mask=b"\x01\x00"), InvalidRequest,
                     "attention mask has 2 bytes, expected batch x tokens = 6", id="mask-wrong-size"),
        pytest.param(forward_request(encode(torch.randn(1, 3, HIDDEN)), attention_mask=b"\x01\x02\x01"), InvalidRequest,
                     "attention mask bytes must be 0 (pad) or 1 (token)", id="mask-not-binary"),
        pytest.param(forward_request(encode(torch.randn(1, 0, HIDDEN))), InvalidRequest,
                     "of shape (1, 0, 64) are empty", id="no-tokens"),
        pytest.param(forward_request(tensor_with(), response_codec="gzip"), InvalidRequest,
                     "unknown codec 'gzip'", id="unknown-response-codec"),
    ],
)
def test_bad_forward_is_refused_and_the_server_keeps_serving(served, request_message, error_type, needle):
    error = error_of(served, RPC_FORWARD, [request_message], pb.ForwardResponse)
    assert type(error) is error_type and needle in str(error), repr(error)
    assert_still_serving(served)


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        pytest.param([pb.Frame(payload=b"\xff\x00not a protobuf\x07", last=True)], "malformed ForwardRequest",
                     id="garbage-bytes"),
        pytest.param([], "empty forward request", id="no-message"),
        pytest.param([pb.Frame(payload=b"\x0a\x04", last=False)], "stream ended in the middle of a message",
                     id="unfinished-message"),
        pytest.param([pb.Frame(payload=b"", last=False)] * 1000, "empty frame in the middle of a message", id="empty-frames"),
    ],
)
def test_malformed_forward_stream(served, items, needle):
    error = error_of(served, RPC_FORWARD, items, pb.ForwardResponse)
    assert isinstance(error, InvalidRequest) and needle in str(error), repr(error)
    assert_still_serving(served)


def test_oversized_message_is_cut_off(served):
    """A message larger than the server's limits allow (hidden states of max_tokens_per_request tokens
    plus the largest adapter, far below MAX_MESSAGE_BYTES): the server stops collecting it and says why."""
    chunk = pb.Frame(payload=bytes(MAX_FRAME_BYTES), last=False)
    frames = [chunk] * 4
    began = time.monotonic()
    error = error_of(served, RPC_FORWARD, frames, pb.ForwardResponse)
    assert isinstance(error, InvalidRequest), repr(error)
    limit = int(re.search(r"message exceeds the limit of (\d+) bytes", str(error)).group(1))
    assert MAX_FRAME_BYTES // 4 < limit < 2 * MAX_FRAME_BYTES  # 64 tokens x 64 floats, plus rank-4 LoRA on 6 small blocks
    assert time.monotonic() - began < REPLY_TIMEOUT
    assert_still_serving(served)


def test_frame_cap_and_framing():
    """Unit test of the cap itself: read_message stops once a message passes max_bytes."""

    async def endless() -> AsyncIterator[pb.Frame]:
        while True:
            yield pb.Frame(payload=b"x" * 100, last=False)

    with pytest.raises(InvalidRequest, match="message exceeds the limit of 250 bytes"):
        run_sync(read_message(endless(), pb.ForwardRequest, max_bytes=250))
    big = pb.ForwardRequest(hidden_states=encode(torch.zeros(3, MAX_FRAME_BYTES // 4)))
    frames = list(to_frames(big))
    assert len(frames) == 4 and [frame.last for frame in frames] == [False, False, False, True]
    assert run_sync(read_message(_frames(frames), pb.ForwardRequest)) == big
    with pytest.raises(InvalidRequest, match="exceeds the limit"):
        run_sync(read_message(_frames(frames), pb.ForwardRequest, max_bytes=3 * MAX_FRAME_BYTES))


# ---- inference sessions ------------------------------------------------------------------------


def open_request(max_length: int = 8, batch_size: int = 1, span: tuple[int, int] = (0, 3)) -> pb.InferenceRequest:
    return pb.InferenceRequest(open=pb.SessionOpen(span=pb.Span(start=span[0], end=span[1]), max_length=max_length,
                                                   batch_size=batch_size))


def step_request(position: int, tokens: int) -> pb.InferenceRequest:
    return pb.InferenceRequest(step=pb.InferenceStep(hidden_states=encode(torch.randn(1, tokens, HIDDEN)), position=position))


def reordered(request: pb.InferenceRequest, rows: list[int]) -> pb.InferenceRequest:
    request.step.reorder.extend(rows)
    return request


def bad_open(served: Served, max_length: int, batch_size: int, span: tuple[int, int] = (0, 3)) -> SwarmError:
    session = SpanSession(served.client.p2p, served.peer, *span, max_length, batch_size, RAW)
    try:
        with pytest.raises(SwarmError) as raised:
            run_sync(session.open(), REPLY_TIMEOUT)
    finally:
        run_sync(session.close())
    return raised.value


def bad_step(served: Served, max_length: int, steps: list[tuple[torch.Tensor, int]]) -> SwarmError:
    """Open a session of batch 1 and send `steps` (hidden states, position); all but the last must succeed."""
    session = SpanSession(served.client.p2p, served.peer, 0, 3, max_length, 1, RAW)
    run_sync(session.open(), REPLY_TIMEOUT)
    try:
        for hidden, position in steps[:-1]:
            run_sync(session.step(hidden, position), REPLY_TIMEOUT)
        with pytest.raises(SwarmError) as raised:
            run_sync(session.step(*steps[-1]), REPLY_TIMEOUT)
    finally:
        run_sync(session.close())
    return raised.value


BYSTANDER_LENGTH = 32  # tokens: the bystander's session holds this much of the cache


@pytest.fixture(scope="module")
def bystander(served: Served) -> Iterator[tuple[SpanSession, torch.Tensor]]:
    """Another client's session, open on the same server while the bad requests arrive: (session, its inputs)."""
    other = SwarmClient(served.initial_peers, served.client.dht_prefix, NUM_BLOCKS, codecs=RAW)
    other.start()
    inputs = torch.randn(1, BYSTANDER_LENGTH, HIDDEN, generator=torch.Generator().manual_seed(1))
    session = SpanSession(other.p2p, served.peer, 0, 3, BYSTANDER_LENGTH, 1, RAW)
    try:
        run_sync(session.open())
        yield session, inputs
        run_sync(session.close())
    finally:
        other.shutdown()


def test_bad_sessions_are_refused_while_another_client_decodes(served, bystander):
    session, inputs = bystander
    expected = served.local(inputs)
    outputs = [run_sync(session.step(inputs[:, :4], 0))]
    position = 4

    def bystander_step() -> None:  # one more token of the other client's session, between bad requests
        nonlocal position
        outputs.append(run_sync(session.step(inputs[:, position : position + 1], position)))
        position += 1

    client_side = [  # through the client's own SpanSession: what a user of the client would see
        (lambda: bad_open(served, 1000, 1), InvalidRequest, "max_length 1000 is outside 1..128"),
        (lambda: bad_open(served, 8, 9), InvalidRequest, "batch size 9 is outside 1..4"),
        (lambda: bad_open(served, 8, 1, (3, 6)), RemoteError, "blocks 3:6 are not served here"),
        (lambda: bad_step(served, 8, [(torch.randn(1, 4, HIDDEN), 0), (torch.randn(1, 5, HIDDEN), 4)]),
         InvalidRequest, "step to position 9 is past the session's max_length 8"),
        (lambda: bad_step(served, 8, [(torch.randn(1, 2, HIDDEN), 0), (torch.randn(1, 1, HIDDEN), 3)]),
         InvalidRequest, "step starts at position 3, past the session's position 2"),
        (lambda: bad_step(served, 8, [(torch.randn(1, 2, 32), 0)]), InvalidRequest, "must have shape (batch, seq, 64)"),
        (lambda: bad_step(served, 8, [(torch.full((1, 2, HIDDEN), float("nan")), 0)]), InvalidRequest, "NaN or Inf"),
        (lambda: bad_step(served, 8, [(torch.randn(1, 1, HIDDEN), 0), (torch.randn(2, 1, HIDDEN), 1)]),
         InvalidRequest, "step has batch 2, the session was opened with 1"),
    ]
    garbage = pb.Frame(payload=b"\xff\xfe\xfd", last=True)
    hand_built = [  # what only a broken or hostile client sends
        ([step_request(0, 1)], "an inference session must start with an `open` message"),
        ([], "an inference session must start with an `open` message"),
        ([garbage], "malformed InferenceRequest"),
        ([open_request(), open_request()], "expected an inference step"),
        ([open_request(), garbage], "malformed InferenceRequest"),
        ([open_request(), reordered(step_request(0, 1), [0, 0])], "reorder must give one row in 0..0 for each of the session's 1 rows"),
        ([open_request(), reordered(step_request(0, 1), [3])], "reorder must give one row in 0..0"),
    ]
    for make_error, error_type, needle in client_side:
        began = time.monotonic()
        error = make_error()
        assert type(error) is error_type and needle in str(error), repr(error)
        # At once: the server replies before it waits (up to 1 s) for the caller to close its side.
        assert time.monotonic() - began < 0.9, f"{needle!r} took {time.monotonic() - began:.1f} s"
        bystander_step()
    for items, needle in hand_built:
        error = error_of(served, RPC_INFERENCE, items, pb.InferenceResponse)
        assert isinstance(error, InvalidRequest) and needle in str(error), repr(error)
        bystander_step()

    torch.testing.assert_close(torch.cat(outputs, dim=1), expected[:, :position], atol=1e-5, rtol=0)
    assert_still_serving(served)


# ---- the attention-cache budget ----------------------------------------------------------------


def cache_tokens_left(served: Served) -> int:
    info = call_unary(served.client.p2p, served.peer, RPC_INFO, pb.InfoRequest(), pb.InfoResponse, REPLY_TIMEOUT)
    return run_sync(info).cache_tokens_left


def test_cache_budget_refuses_in_bounded_time_then_frees(served, bystander):
    client, peer = served.client, served.peer
    left = cache_tokens_left(served)
    assert left == CACHE_TOKENS - BYSTANDER_LENGTH

    began = time.monotonic()
    error = bad_open(served, 128, 4)
    whole = f"{CACHE_TOKENS * KV_BYTES_PER_TOKEN / 2**20:.2f} MiB"
    assert isinstance(error, CacheFull) and f"a session of 512 tokens needs {512 * KV_BYTES_PER_TOKEN / 2**20:.2f} MiB, " \
        f"more than this server's whole cache of {whole}" in str(error), repr(error)
    assert time.monotonic() - began < 5  # refused at once: it could never fit

    holder = SpanSession(client.p2p, peer, 0, 3, 100, 2, RAW)
    run_sync(holder.open())  # 200 tokens
    began = time.monotonic()
    error = bad_open(served, 100, 1)
    waited = time.monotonic() - began
    assert isinstance(error, CacheFull), repr(error)
    assert f"no cache room for a session of 100 tokens ({100 * KV_BYTES_PER_TOKEN / 2**20:.2f} MiB) within " \
        f"{CACHE_WAIT_TIMEOUT:.0f} s ({(left - 200) * KV_BYTES_PER_TOKEN / 2**20:.2f} MiB of {whole} left)" in str(error), repr(error)
    assert CACHE_WAIT_TIMEOUT - 0.5 < waited < CACHE_WAIT_TIMEOUT + 5, waited

    async def open_while_holder_closes() -> SpanSession:
        waiting = SpanSession(client.p2p, peer, 0, 3, 100, 1, RAW)
        opening = asyncio.ensure_future(waiting.open())
        await asyncio.sleep(1.0)
        assert not opening.done()  # waiting for room, not refused
        await holder.close()
        await asyncio.wait_for(opening, REPLY_TIMEOUT)
        return waiting

    waiting = run_sync(open_while_holder_closes())
    step = run_sync(waiting.step(GOOD_INPUT[:1, :3], 0))
    torch.testing.assert_close(step, served.local(GOOD_INPUT[:1, :3]), atol=1e-5, rtol=0)
    run_sync(waiting.close())
    assert cache_tokens_left(served) == left  # every refused or closed session gave its tokens back
    assert_still_serving(served)


def test_a_sessions_adapter_counts_in_the_cache_budget(served, bystander):
    """The cache budget is in bytes and covers what a session holds: its adapter costs room too."""
    left = cache_tokens_left(served)
    plain = SpanSession(served.client.p2p, served.peer, 0, 3, 10, 1, RAW)
    run_sync(plain.open())
    assert cache_tokens_left(served) == left - 10
    run_sync(plain.close())
    adapted = SpanSession(served.client.p2p, served.peer, 0, 3, 10, 1, RAW, lora())  # rank 2 on one q_proj: 1 KiB
    run_sync(adapted.open())
    assert cache_tokens_left(served) == left - math.ceil((10 * KV_BYTES_PER_TOKEN + 2 * 2 * HIDDEN * 4) / KV_BYTES_PER_TOKEN)
    run_sync(adapted.close())
    assert cache_tokens_left(served) == left


# ---- backward ----------------------------------------------------------------------------------


def backward_request(grads: torch.Tensor, adapter: pb.Adapter | None = None) -> pb.BackwardRequest:
    request = pb.BackwardRequest(span=pb.Span(start=0, end=3), hidden_states=encode(torch.randn(1, 4, HIDDEN)),
                                 grad_outputs=encode(grads))
    if adapter is not None:
        request.adapter.CopyFrom(adapter)
    return request


def lora(rank: int = 2, name: str = "0.self_attn.q_proj", shape_a: tuple = (2, HIDDEN), shape_b: tuple = (HIDDEN, 2)) -> pb.Adapter:
    return pb.Adapter(lora_rank=rank, lora_alpha=4, lora=[
        pb.NamedTensor(name=f"{name}.lora_A", tensor=encode(torch.randn(*shape_a))),
        pb.NamedTensor(name=f"{name}.lora_B", tensor=encode(torch.randn(*shape_b))),
    ])


@pytest.mark.parametrize(
    ("grads", "adapter", "needle"),
    [
        pytest.param(torch.randn(1, 5, HIDDEN), None, "do not match the inputs'", id="grad-shape"),
        pytest.param(torch.full((1, 4, HIDDEN), float("inf")), None, "gradients contain NaN or Inf", id="grad-inf"),
        pytest.param(torch.randn(1, 4, HIDDEN), lora(rank=8, shape_a=(8, HIDDEN), shape_b=(HIDDEN, 8)),
                     "rank 8 is outside 1..4", id="lora-rank-over-limit"),
        pytest.param(torch.randn(1, 4, HIDDEN), lora(shape_a=(2, 32)), "expected (2, 64)", id="lora-shape"),
        pytest.param(torch.randn(1, 4, HIDDEN), lora(name="0.self_attn.nope"), "has no module 'self_attn.nope'",
                     id="lora-unknown-module"),
        pytest.param(torch.randn(1, 4, HIDDEN), lora(name="4.self_attn.q_proj"), "outside the requested blocks 0:3",
                     id="lora-block-outside-span"),
        pytest.param(torch.randn(1, 4, HIDDEN), lora(name="0.input_layernorm"), "is not a linear layer",
                     id="lora-not-linear"),
    ],
)
def test_bad_backward_is_refused(served, grads, adapter, needle):
    error = error_of(served, RPC_BACKWARD, [backward_request(grads, adapter)], pb.BackwardResponse)
    assert isinstance(error, InvalidRequest) and needle in str(error), repr(error)
    (good,) = exchange(served, RPC_BACKWARD, [backward_request(torch.randn(1, 4, HIDDEN), lora())], pb.BackwardResponse)
    assert not good.HasField("error") and len(good.lora_grads) == 2, good.error.message


# ---- blocks that nobody serves -----------------------------------------------------------------


def test_missing_blocks_fail_clearly_in_bounded_time(served):
    model = AutoDistributedModelForCausalLM.from_pretrained(served.model_path, initial_peers=served.initial_peers,
                                                            route_wait=2, wire_codec="none")
    try:
        began = time.monotonic()
        with pytest.raises(MissingBlocksError, match="no online server holds blocks 3:6 of ") as raised:
            with torch.no_grad():
                model(torch.randint(3, 211, (1, 5)))
        assert raised.value.missing == [(3, 6)]
        assert time.monotonic() - began < 15
    finally:
        model.swarm_client.shutdown()
