"""Tensors to and from `swarm.rpc.Tensor`, checked on the way in.

Decoding never unpickles: it reads raw bytes of an allow-listed dtype and checks the byte
count against the declared shape before building the tensor.
"""

from __future__ import annotations

import math

import torch

from swarm.errors import InvalidRequest
from swarm.limits import WIRE_DTYPES
from swarm.wire import swarm_rpc_pb2 as pb

_TORCH_DTYPES = {name: getattr(torch, name) for name in WIRE_DTYPES}
CODECS = ("none",)


def serialize_tensor(tensor: torch.Tensor, codec: str = "none") -> pb.Tensor:
    """Encode a tensor of a wire dtype; `codec` must be one of CODECS."""
    if codec not in CODECS:
        raise InvalidRequest(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if dtype_name not in _TORCH_DTYPES:
        raise InvalidRequest(f"dtype {dtype_name} cannot go on the wire (allowed: {', '.join(WIRE_DTYPES)})")
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    data = flat.view(torch.uint8).numpy().tobytes()
    return pb.Tensor(shape=list(tensor.shape), dtype=dtype_name, codec=codec, data=data)


def deserialize_tensor(message: pb.Tensor, max_elements: int | None = None) -> torch.Tensor:
    """Decode a tensor, raising InvalidRequest if its header and payload disagree."""
    if message.codec not in CODECS:
        raise InvalidRequest(f"unknown codec {message.codec!r} (known: {', '.join(CODECS)})")
    dtype = _TORCH_DTYPES.get(message.dtype)
    if dtype is None:
        raise InvalidRequest(f"dtype {message.dtype!r} is not allowed (allowed: {', '.join(WIRE_DTYPES)})")
    shape = tuple(message.shape)
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise InvalidRequest(f"tensor of shape {shape} has {numel} elements, more than the limit {max_elements}")
    expected_bytes = numel * torch.empty((), dtype=dtype).element_size()
    if len(message.data) != expected_bytes:
        raise InvalidRequest(f"tensor of shape {shape} and dtype {message.dtype} needs {expected_bytes} bytes, got {len(message.data)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(shape)
