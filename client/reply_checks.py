"""Checking what servers send back before anything uses it.

A reply is a server's claim: its tensors must have exactly the shape that was asked for (checked
on the declared shape before decoding, so a lying header costs nothing), decode cleanly and be
finite. Anything else is that server's fault: a RemoteError naming it, which the retry policy
turns into a ban and a reroute, never a crash or a wrong token downstream.
"""

from __future__ import annotations

import math

import torch

from swarm.errors import InvalidRequest, RemoteError
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import decode


def decode_reply(peer_id: str, message: pb.Tensor, expected_shape: tuple[int, ...], what: str) -> torch.Tensor:
    """Decode a server's tensor `what`, which must have `expected_shape` and finite values."""
    shape = tuple(message.shape)
    if shape != tuple(expected_shape):
        raise RemoteError(peer_id, f"sent {what} of shape {shape}, expected {tuple(expected_shape)}")
    try:
        tensor = decode(message, max_elements=math.prod(expected_shape))
    except InvalidRequest as e:
        raise RemoteError(peer_id, f"sent {what} that cannot be decoded: {e}") from None
    if not torch.isfinite(tensor).all():
        raise RemoteError(peer_id, f"sent {what} with NaN or Inf values")
    return tensor


def decode_named_replies(
    peer_id: str, replies: list[pb.NamedTensor], sent: list[pb.NamedTensor], what: str
) -> dict[str, torch.Tensor]:
    """Gradients named like the tensors that were sent: each name once, each shape as sent."""
    expected = {named.name: tuple(named.tensor.shape) for named in sent}
    decoded: dict[str, torch.Tensor] = {}
    for named in replies:
        if named.name not in expected or named.name in decoded:
            raise RemoteError(peer_id, f"sent {what} for {named.name!r}, which was not asked for")
        decoded[named.name] = decode_reply(peer_id, named.tensor, expected[named.name], f"{what} {named.name!r}")
    missing = expected.keys() - decoded.keys()
    if missing:
        raise RemoteError(peer_id, f"sent no {what} for {', '.join(sorted(missing)[:3])}")
    return decoded
