"""Wire codecs: round trips within each codec's error bound, and clear errors for bad payloads."""

from __future__ import annotations

import math

import pytest
import torch

from swarm.errors import InvalidRequest
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import BLOCK_SIZE, CODECS, decode, encode, encoded_size

# Relative error (norm of the difference over the norm of the input) each codec must stay within
# on Gaussian data; measured values are about 0, 2e-4, 2e-3, 1e-2, 9e-2 and 8.6e-2.
_SCALE_DTYPES = {"int8": torch.float32, "nf4": torch.float32, "nf4o": torch.bfloat16}
ERROR_BOUNDS = {"none": 0.0, "fp16": 1e-3, "bf16": 5e-3, "int8": 2e-2, "nf4": 0.12, "nf4o": 0.11}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 64), (1, 1, 576), (3, 7, 96), (1, 0, 64), (1, 3, 50)])
def test_round_trip(codec, dtype, shape):
    torch.manual_seed(0)
    tensor = (torch.randn(shape) * 4).to(dtype)
    restored = decode(encode(tensor, codec))
    assert restored.shape == tensor.shape and restored.dtype == dtype
    if tensor.numel():
        error = ((restored.float() - tensor.float()).norm() / tensor.float().norm()).item()
        assert error <= ERROR_BOUNDS[codec] + (8e-3 if dtype != torch.float32 else 0.0)


def test_sizes_shrink_as_promised():
    tensor = torch.randn(1, 1, 576)
    sizes = {codec: encoded_size(encode(tensor, codec)) for codec in CODECS}
    # nf4o: codes, a bfloat16 scale per block of 64, one (uint16 position, bfloat16 value) per block: 0.297x bf16.
    assert sizes == {"none": 2304, "fp16": 1152, "bf16": 1152, "int8": 576 + 36, "nf4": 288 + 36, "nf4o": 288 + 18 + 36}


def test_unknown_codec_and_dtype():
    with pytest.raises(InvalidRequest, match="unknown codec 'zip'"):
        encode(torch.randn(2, 2), "zip")
    message = encode(torch.randn(2, 2), "none")
    message.codec = "zip"
    with pytest.raises(InvalidRequest, match="unknown codec 'zip'"):
        decode(message)
    message = encode(torch.randn(2, 2), "none")
    message.dtype = "int64"
    with pytest.raises(InvalidRequest, match="dtype 'int64' is not allowed"):
        decode(message)
    with pytest.raises(InvalidRequest, match="cannot go on the wire"):
        encode(torch.arange(4), "none")


@pytest.mark.parametrize("codec", CODECS)
def test_payload_that_disagrees_with_its_header(codec):
    message = encode(torch.randn(2, 3, 64), codec)
    message.shape[1] = 4
    with pytest.raises(InvalidRequest, match="needs .* bytes, got"):
        decode(message)


@pytest.mark.parametrize("codec", ["int8", "nf4", "nf4o"])
def test_bad_scales(codec):
    message = encode(torch.randn(1, 2, 64), codec)
    message.scales = message.scales[:-4]
    with pytest.raises(InvalidRequest, match="scales"):
        decode(message)
    message = encode(torch.randn(1, 2, 64), codec)
    message.scales = torch.tensor([math.nan, 1.0]).to(_SCALE_DTYPES[codec]).view(torch.uint8).numpy().tobytes()
    with pytest.raises(InvalidRequest, match="finite"):
        decode(message)
    message = encode(torch.randn(1, 2, 64), codec)
    message.block_size = BLOCK_SIZE * 2
    with pytest.raises(InvalidRequest, match="block size"):
        decode(message)


def test_element_limit():
    with pytest.raises(InvalidRequest, match="more than the limit"):
        decode(encode(torch.randn(4, 64), "none"), max_elements=100)


def test_nf4o_keeps_outliers_that_sink_nf4():
    """A few huge channels (as in real hidden states) cost nf4 the rest of their block, not nf4o."""
    torch.manual_seed(0)
    tensor = torch.randn(2, 3, 576)
    tensor[..., [7, 300]] = torch.tensor([3000.0, -900.0])
    normal = torch.ones(576, dtype=torch.bool)
    normal[[7, 300]] = False

    def error_of_normal_channels(codec: str) -> float:
        restored = decode(encode(tensor, codec))
        return ((restored - tensor)[..., normal].norm() / tensor[..., normal].norm()).item()

    assert error_of_normal_channels("nf4o") < 0.11 < error_of_normal_channels("nf4")
    restored = decode(encode(tensor, "nf4o"))
    torch.testing.assert_close(restored[..., [7, 300]], tensor[..., [7, 300]], rtol=4e-3, atol=0)  # bfloat16


def test_nf4o_bad_outliers():
    message = encode(torch.randn(1, 2, 64), "nf4o")
    message.outlier_index = message.outlier_index[:-2]
    with pytest.raises(InvalidRequest, match="nf4o outlier positions of shape \\(2, 1\\) needs 4 bytes, got 2"):
        decode(message)
    message = encode(torch.randn(1, 2, 64), "nf4o")
    message.outlier_index = torch.tensor([3, 64], dtype=torch.int32).to(torch.uint16).view(torch.uint8).numpy().tobytes()
    with pytest.raises(InvalidRequest, match="positions must be below the row length 64"):
        decode(message)
    message = encode(torch.randn(1, 2, 64), "nf4o")
    message.outlier_values = torch.tensor([1.0, math.inf]).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    with pytest.raises(InvalidRequest, match="outlier values must be finite"):
        decode(message)
    message = encode(torch.randn(1, 2, 64), "nf4o")
    message.outlier_values = b""
    with pytest.raises(InvalidRequest, match="outlier values .* needs 4 bytes, got 0"):
        decode(message)


def test_nf4o_rows_longer_than_its_positions_can_name():
    with pytest.raises(InvalidRequest, match="rows of at most 65536 values"):
        encode(torch.zeros(1, 2**16 + 1), "nf4o")
    message = pb.Tensor(shape=[1, 2**16 + 1], dtype="float32", codec="nf4o", block_size=BLOCK_SIZE)
    with pytest.raises(InvalidRequest, match="rows of at most 65536 values"):
        decode(message)  # refused from the header alone, before any allocation
