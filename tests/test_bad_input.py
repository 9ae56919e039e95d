"""Bad input on the wire gets an error reply naming the problem, and the server keeps serving everyone.

One real server (tiny llama, blocks 0:3 of 6, small limits) takes every malformed request below
while another client's inference session stays open on it; afterwards both that session and a
fresh forward still give the right results.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarm.client.event_loop import run_sync
from swarm.client.local_processes import LocalSwarm
from swarm.client.span_session import SpanSession
from swarm.client.swarm_client import SwarmClient
from swarm.client.wire_codecs import WireCodecs
from swarm.dht import fetch_block_records
from swarm.errors import CacheFull, InvalidRequest
from swarm.limits import MAX_FRAME_BYTES
from swarm.transport import open_stream
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import decode, encode
from swarm.wire.frames import read_message, to_frames
from swarm.wire.rpc import RPC_BACKWARD, RPC_FORWARD, RPC_INFERENCE

pytestmark = pytest.mark.timeout(300)
HIDDEN = 64
RAW = WireCodecs("none", "none")


@pytest.fixture(scope="module")
def server(tiny_models):
    """(client, peer id of the server) for a server with small limits."""
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_server(tiny_models["llama"], "0:3", "--num-threads", "1", "--max-batch-size", "4",
                           "--max-tokens-per-request", "64", "--max-session-length", "128", "--max-lora-rank", "4",
                           "--attn-cache-tokens", "300")
        client = SwarmClient(swarm.initial_peers, _prefix(tiny_models["llama"]), 6, codecs=RAW)
        client.start()
        (peer,) = fetch_block_records(client.dht, client.dht_prefix, 6)[0]
        yield client, peer
        client.shutdown()
    finally:
        swarm.stop()


def _prefix(path):  # noqa: ANN001, ANN202
    from swarm.model_id import model_dht_prefix

    return model_dht_prefix(path)


async def _exchange(client: SwarmClient, peer: str, rpc: str, messages: list, response_type: type):  # noqa: ANN202
    async def frames():  # noqa: ANN202
        for message in messages:
            if isinstance(message, pb.Frame):
                yield message
            else:
                for frame in to_frames(message):
                    yield frame

    replies = await open_stream(client.p2p, peer, rpc, frames(), 20)
    return await asyncio.wait_for(read_message(replies, response_type), 30)


def forward(client: SwarmClient, peer: str, hidden: pb.Tensor, start: int = 0, end: int = 3, **fields) -> pb.ForwardResponse:  # noqa: ANN003
    request = pb.ForwardRequest(span=pb.Span(start=start, end=end), hidden_states=hidden, **fields)
    return run_sync(_exchange(client, peer, RPC_FORWARD, [request], pb.ForwardResponse))


def good_forward(client: SwarmClient, peer: str) -> torch.Tensor:
    reply = forward(client, peer, encode(torch.ones(1, 4, HIDDEN)))
    assert not reply.HasField("error"), reply.error.message
    return decode(reply.hidden_states)


def tensor_with(**changes) -> pb.Tensor:  # noqa: ANN003
    message = encode(torch.randn(1, 4, HIDDEN))
    for name, value in changes.items():
        if name == "shape":
            del message.shape[:]
            message.shape.extend(value)
        else:
            setattr(message, name, value)
    return message


@pytest.mark.parametrize(
    ("hidden", "span", "fields", "kind", "needle"),
    [
        (encode(torch.randn(1, 4, HIDDEN)), (3, 6), {}, pb.Error.SPAN_NOT_SERVED, "not served here"),
        (encode(torch.randn(1, 4, 32)), (0, 3), {}, pb.Error.INVALID_REQUEST, "must have shape (batch, seq, 64)"),
        (tensor_with(dtype="int64"), (0, 3), {}, pb.Error.INVALID_REQUEST, "dtype 'int64' is not allowed"),
        (tensor_with(shape=[1, 5, HIDDEN]), (0, 3), {}, pb.Error.INVALID_REQUEST, "needs 1280 bytes, got 1024"),
        (tensor_with(codec="zip"), (0, 3), {}, pb.Error.INVALID_REQUEST, "unknown codec 'zip'"),
        (encode(torch.full((1, 4, HIDDEN), float("nan"))), (0, 3), {}, pb.Error.INVALID_REQUEST, "NaN or Inf"),
        (encode(torch.randn(1, 65, HIDDEN)), (0, 3), {}, pb.Error.INVALID_REQUEST, "more than the limit"),
        (encode(torch.randn(5, 2, HIDDEN)), (0, 3), {}, pb.Error.INVALID_REQUEST, "batch 5 exceeds the limit 4"),
        (encode(torch.randn(1, 4, HIDDEN)), (0, 3), {"response_codec": "gzip"}, pb.Error.INVALID_REQUEST, "unknown codec 'gzip'"),
        (encode(torch.randn(1, 4, HIDDEN)), (2, 2), {}, pb.Error.SPAN_NOT_SERVED, "not served here"),
    ],
)
def test_bad_forward_requests(server, hidden, span, fields, kind, needle):
    client, peer = server
    reply = forward(client, peer, hidden, *span, **fields)
    assert reply.error.kind == kind and needle in reply.error.message, reply.error.message


def test_garbage_and_oversized_messages(server):
    client, peer = server
    garbage = pb.Frame(payload=b"\xff\x00not a protobuf\x07", last=True)
    reply = run_sync(_exchange(client, peer, RPC_FORWARD, [garbage], pb.ForwardResponse))
    assert reply.error.kind == pb.Error.INVALID_REQUEST and "malformed" in reply.error.message

    async def unterminated():  # noqa: ANN202
        yield pb.Frame(payload=b"x" * 100, last=False)

    with pytest.raises(InvalidRequest, match="exceeds the limit of 150 bytes"):
        run_sync(read_message(_chain(unterminated(), unterminated()), pb.ForwardRequest, max_bytes=150))
    assert len(list(to_frames(pb.Frame(payload=b"y" * (3 * MAX_FRAME_BYTES))))) == 4


async def _chain(*iterators):  # noqa: ANN002, ANN202
    for iterator in iterators:
        async for item in iterator:
            yield item


def test_bad_inference_sessions_and_others_keep_working(server):
    client, peer = server
    reference = good_forward(client, peer)
    bystander = SpanSession(client.p2p, peer, 0, 3, 16, 1, RAW)
    run_sync(bystander.open())
    first = run_sync(bystander.step(torch.ones(1, 4, HIDDEN), 0))

    def session(*requests: pb.InferenceRequest) -> list[pb.InferenceResponse]:
        async def go():  # noqa: ANN202
            async def frames():  # noqa: ANN202
                for request in requests:
                    for frame in to_frames(request):
                        yield frame

            replies = await open_stream(client.p2p, peer, RPC_INFERENCE, frames(), 20)
            found = []
            while (reply := await asyncio.wait_for(read_message(replies, pb.InferenceResponse), 30)) is not None:
                found.append(reply)
            return found

        return run_sync(go())

    opening = pb.InferenceRequest(open=pb.SessionOpen(span=pb.Span(start=0, end=3), max_length=8, batch_size=1))
    step = lambda position, tokens: pb.InferenceRequest(  # noqa: E731
        step=pb.InferenceStep(hidden_states=encode(torch.randn(1, tokens, HIDDEN)), position=position, step_id=1)
    )
    cases = [
        ((step(0, 1),), "must start with an `open`"),
        ((pb.InferenceRequest(open=pb.SessionOpen(span=pb.Span(start=0, end=3), max_length=1000, batch_size=1)),), "max_length 1000 is outside 1..128"),
        ((pb.InferenceRequest(open=pb.SessionOpen(span=pb.Span(start=0, end=3), max_length=8, batch_size=9)),), "batch size 9 is outside 1..4"),
        ((opening, step(0, 9)), "past the session's max_length 8"),
        ((opening, step(3, 1)), "past the session's position 0"),
        ((opening, pb.InferenceRequest(step=pb.InferenceStep(hidden_states=encode(torch.randn(2, 1, HIDDEN)), position=0))), "batch 2"),
    ]
    for requests, needle in cases:
        replies = session(*requests)
        assert replies[-1].error.message and needle in replies[-1].error.message, replies[-1]

    second = run_sync(bystander.step(torch.ones(1, 1, HIDDEN), 4))  # the bystander's session is intact
    assert second.shape == (1, 1, HIDDEN) and torch.isfinite(second).all()
    run_sync(bystander.close())
    torch.testing.assert_close(good_forward(client, peer), reference)
    torch.testing.assert_close(first, reference)


def test_cache_budget_refuses_then_frees(server):
    client, peer = server
    too_big = SpanSession(client.p2p, peer, 0, 3, 128, 4, RAW)
    with pytest.raises(CacheFull, match="exceeds this server's whole cache of 300 tokens"):
        run_sync(too_big.open())
    holder = SpanSession(client.p2p, peer, 0, 3, 100, 2, RAW)
    run_sync(holder.open())  # holds 200 of 300 tokens
    waiting = SpanSession(client.p2p, peer, 0, 3, 128, 1, RAW)
    with pytest.raises(CacheFull, match="no cache room for 128 tokens"):
        run_sync(waiting.open())
    run_sync(holder.close())
    fits = SpanSession(client.p2p, peer, 0, 3, 128, 1, RAW)
    run_sync(fits.open())
    run_sync(fits.close())


def backward(client: SwarmClient, peer: str, grads: torch.Tensor, adapter: pb.Adapter | None = None) -> pb.BackwardResponse:
    request = pb.BackwardRequest(span=pb.Span(start=0, end=3), hidden_states=encode(torch.randn(1, 4, HIDDEN)),
                                 grad_outputs=encode(grads))
    if adapter is not None:
        request.adapter.CopyFrom(adapter)
    return run_sync(_exchange(client, peer, RPC_BACKWARD, [request], pb.BackwardResponse))


def lora(rank: int = 2, name: str = "0.self_attn.q_proj", shape_a: tuple = (2, HIDDEN), shape_b: tuple = (HIDDEN, 2)) -> pb.Adapter:
    return pb.Adapter(lora_rank=rank, lora_alpha=4, lora=[
        pb.NamedTensor(name=f"{name}.lora_A", tensor=encode(torch.randn(*shape_a))),
        pb.NamedTensor(name=f"{name}.lora_B", tensor=encode(torch.randn(*shape_b))),
    ])


@pytest.mark.parametrize(
    ("grads", "adapter", "needle"),
    [
        (torch.randn(1, 5, HIDDEN), None, "do not match the inputs'"),
        (torch.full((1, 4, HIDDEN), float("inf")), None, "gradients contain NaN or Inf"),
        (torch.randn(1, 4, HIDDEN), lora(rank=8, shape_a=(8, HIDDEN), shape_b=(HIDDEN, 8)), "rank 8 is outside 1..4"),
        (torch.randn(1, 4, HIDDEN), lora(shape_a=(2, 32)), "expected (2, 64)"),
        (torch.randn(1, 4, HIDDEN), lora(name="0.self_attn.nope"), "has no module 'self_attn.nope'"),
        (torch.randn(1, 4, HIDDEN), lora(name="4.self_attn.q_proj"), "outside the requested blocks 0:3"),
        (torch.randn(1, 4, HIDDEN), lora(name="0.input_layernorm"), "is not a linear layer"),
    ],
)
def test_bad_backward_requests(server, grads, adapter, needle):
    client, peer = server
    reply = backward(client, peer, grads, adapter)
    assert reply.error.kind == pb.Error.INVALID_REQUEST and needle in reply.error.message, reply.error.message
    good = backward(client, peer, torch.randn(1, 4, HIDDEN), lora())
    assert not good.HasField("error") and len(good.lora_grads) == 2
