"""Fuzzing with hypothesis: wire bytes, tensors and whole requests; nothing crashes, every case is
answered or dropped, and the server still serves a good request afterwards.

The pure parsers take thousands of cases in a few seconds; the live server takes a few hundred
requests (each a real stream over hivemind). SWARM_FUZZ_SCALE multiplies both, for long runs:
`SWARM_FUZZ_SCALE=20 bash scripts/test.sh tests/test_fuzz.py`.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.errors import InvalidRequest, RemoteError
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import CODECS, decode, encode
from swarm.wire.frames import parse_message
from swarm.wire.rpc import RPC_BACKWARD, RPC_FORWARD, RPC_INFERENCE
from tests.test_bad_input import HIDDEN, assert_still_serving, exchange, served  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(600)

SCALE = int(os.environ.get("SWARM_FUZZ_SCALE", "1"))
PURE = settings(max_examples=1500 * SCALE, deadline=None, derandomize=True)
LIVE = settings(max_examples=150 * SCALE, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

MESSAGE_TYPES = [pb.ForwardRequest, pb.BackwardRequest, pb.InferenceRequest, pb.Frame, pb.Tensor, pb.Adapter]
DTYPES = ["float32", "bfloat16", "float16", "float64", "int8", "", "fp33"]

dims = st.integers(min_value=0, max_value=2**34)
small_dims = st.integers(min_value=0, max_value=70)


@st.composite
def tensors(draw: st.DrawFn, realistic: bool = False) -> pb.Tensor:
    """pb.Tensor messages: mostly well-formed ones with one field bent, some pure noise."""
    if draw(st.booleans()):
        shape = draw(st.lists(small_dims, min_size=3, max_size=3)) if realistic else draw(st.lists(small_dims, max_size=4))
        values = torch.randn(tuple(shape)) if torch.Size(shape).numel() <= 20_000 else torch.randn(1, 1, HIDDEN)
        message = encode(values, draw(st.sampled_from(CODECS)))
        bend = draw(st.sampled_from(["none", "shape", "dtype", "data", "scales", "block_size", "codec", "outliers"]))
        if bend == "shape":
            message.ClearField("shape")
            message.shape.extend(draw(st.lists(dims, max_size=5)))
        elif bend == "dtype":
            message.dtype = draw(st.sampled_from(DTYPES))
        elif bend == "data":
            message.data = draw(st.binary(max_size=512))
        elif bend == "scales":
            message.scales = draw(st.binary(max_size=64))
        elif bend == "block_size":
            message.block_size = draw(st.integers(min_value=0, max_value=2**32 - 1))
        elif bend == "outliers":
            message.outlier_index = draw(st.binary(max_size=64))
            message.outlier_values = draw(st.binary(max_size=64))
        elif bend == "codec":
            message.codec = draw(st.sampled_from([*CODECS, "", "zstd", "int4"]))
        return message
    return pb.Tensor(
        shape=draw(st.lists(dims, max_size=5)),
        dtype=draw(st.sampled_from(DTYPES)),
        codec=draw(st.sampled_from([*CODECS, "", "x"])),
        data=draw(st.binary(max_size=256)),
        scales=draw(st.binary(max_size=32)),
        block_size=draw(st.integers(min_value=0, max_value=2**32 - 1)),
    )


@st.composite
def adapters(draw: st.DrawFn) -> pb.Adapter:
    names = st.one_of(
        st.text(max_size=40),
        st.builds(lambda b, m, k: f"{b}.{m}.{k}", st.integers(0, 8),
                  st.sampled_from(["self_attn.q_proj", "mlp.down_proj", "nope", ""]), st.sampled_from(["lora_A", "lora_B", "x"])),
    )
    return pb.Adapter(
        lora_rank=draw(st.integers(min_value=0, max_value=2**32 - 1)),
        lora_alpha=draw(st.floats(allow_nan=True, allow_infinity=True, width=32)),
        lora_dropout=draw(st.floats(allow_nan=True, allow_infinity=True, width=32)),
        lora=[pb.NamedTensor(name=draw(names), tensor=draw(tensors())) for _ in range(draw(st.integers(0, 3)))],
        deep_prompts=draw(tensors()) if draw(st.booleans()) else None,
    )


spans = st.builds(pb.Span, start=st.integers(0, 2**32 - 1) | st.integers(0, 7), end=st.integers(0, 2**32 - 1) | st.integers(0, 7))


# ---- pure parsers ----------------------------------------------------------------------------------


@PURE
@given(payload=st.binary(max_size=4096), message_type=st.sampled_from(MESSAGE_TYPES))
def test_parsing_any_bytes_yields_a_message_or_invalid_request(payload, message_type):
    try:
        parse_message(payload, message_type)
    except InvalidRequest:
        pass


@PURE
@given(message=tensors())
def test_decoding_any_tensor_yields_a_tensor_or_invalid_request(message):
    try:
        tensor = decode(message, max_elements=1 << 20)
    except InvalidRequest:
        return
    assert tuple(tensor.shape) == tuple(message.shape)


# ---- a live server -------------------------------------------------------------------------------


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, list, type]:
    """(rpc, items to send on one stream, reply type): frames of noise or fuzzed messages."""
    rpc = draw(st.sampled_from([RPC_FORWARD, RPC_BACKWARD, RPC_INFERENCE]))
    reply_type = {RPC_FORWARD: pb.ForwardResponse, RPC_BACKWARD: pb.BackwardResponse, RPC_INFERENCE: pb.InferenceResponse}[rpc]
    kind = draw(st.sampled_from(["frames", "message", "message"]))
    if kind == "frames":
        frames = st.builds(pb.Frame, payload=st.binary(max_size=2048), last=st.booleans())
        return rpc, draw(st.lists(frames, max_size=4)), reply_type
    adapter = draw(adapters()) if draw(st.booleans()) else None
    if rpc == RPC_FORWARD:
        message = pb.ForwardRequest(span=draw(spans), hidden_states=draw(tensors(realistic=True)),
                                    response_codec=draw(st.sampled_from([*CODECS, "", "x"])), adapter=adapter,
                                    forward_id=draw(st.integers(0, 2**64 - 1)))
        return rpc, [message], reply_type
    if rpc == RPC_BACKWARD:
        message = pb.BackwardRequest(span=draw(spans), hidden_states=draw(tensors(realistic=True)),
                                     grad_outputs=draw(tensors(realistic=True)), adapter=adapter,
                                     forward_id=draw(st.integers(0, 2**64 - 1)))
        return rpc, [message], reply_type
    opening = pb.SessionOpen(span=draw(spans), max_length=draw(st.integers(0, 300)), batch_size=draw(st.integers(0, 6)),
                             response_codec=draw(st.sampled_from([*CODECS, "x"])), adapter=adapter)
    steps = [pb.InferenceRequest(step=pb.InferenceStep(hidden_states=draw(tensors(realistic=True)),
                                                       position=draw(st.integers(0, 2**32 - 1) | st.integers(0, 8))))
             for _ in range(draw(st.integers(0, 3)))]
    first = [pb.InferenceRequest(open=opening)] if draw(st.integers(0, 9)) else []
    return rpc, first + steps, reply_type


@LIVE
@given(request=requests())
def test_any_request_gets_an_answer_and_the_server_keeps_serving(served, request):  # noqa: F811 (the fixture)
    rpc, items, reply_type = request
    try:
        replies = exchange(served, rpc, items, reply_type)
    except (InvalidRequest, RemoteError):
        return  # the server answered with an error reply, or closed a stream it could not use: both fine
    for reply in replies:
        if reply.HasField("error"):
            assert reply.error.kind != pb.Error.INTERNAL, reply.error.message  # bad input is never the server's fault


def test_the_server_still_serves_after_the_fuzzing(served):  # noqa: F811 (the fixture)
    assert_still_serving(served)
