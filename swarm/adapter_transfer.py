"""Moving adapter slices between peers: a slice message, and fetching one with every byte verified.

A slice is an adapter's manifest plus the matrices of some blocks (proto `AdapterSlice`), framed
like every streamed message (1 MiB frames, a size cap on the way in). A receiver accepts a slice
only if the manifest hashes to the adapter's hash and every matrix has its declared shape (checked
before decoding) and its hash in the manifest (after): a corrupted or forged slice is refused whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import torch

from swarm.adapter_manifest import AdapterManifest, verify_slice
from swarm.errors import InvalidRequest, RemoteError
from swarm.limits import CONNECT_TIMEOUT
from swarm.transport import P2P, call_stream, raise_for_error
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import decode, encode
from swarm.wire.rpc import RPC_ADAPTER_FETCH

FETCH_TIMEOUT = 60.0  # seconds for one slice from one peer
SLICE_OVERHEAD_BYTES = 2 << 20  # a slice's bytes beyond its matrices: the manifest (at most 1 MiB), names, headers


def slice_message(manifest: AdapterManifest, tensors: Mapping[str, torch.Tensor], start: int, end: int) -> pb.AdapterSlice:
    """The manifest and the matrices of blocks [start, end) (none for an empty span)."""
    names = manifest.names_in(start, end) if start < end else []
    return pb.AdapterSlice(manifest=manifest.encode(), span=pb.Span(start=start, end=end),
                           tensors=[pb.NamedTensor(name=n, tensor=encode(tensors[n], "none")) for n in names])


async def fetch_slice(p2p: P2P, peer: str, digest: str, start: int, end: int, manifest: AdapterManifest | None,
                      max_bytes: int) -> tuple[AdapterManifest, dict[str, torch.Tensor]]:
    """The manifest and the verified matrices of blocks [start, end) of adapter `digest` from `peer`.

    The manifest must hash to `digest` (or equal `manifest`, if given) and every matrix its digest:
    anything else is RemoteError naming the peer, and nothing is returned.
    """
    request = pb.AdapterFetchRequest(adapter_hash=digest, span=pb.Span(start=start, end=end))
    try:
        reply = await call_stream(p2p, peer, RPC_ADAPTER_FETCH, request, pb.AdapterFetchResponse, CONNECT_TIMEOUT,
                                  FETCH_TIMEOUT, max_bytes)
    except InvalidRequest as e:  # oversized or malformed: the peer's fault
        raise RemoteError(peer, f"sent a bad adapter slice: {e}") from None
    if reply.HasField("error"):
        raise_for_error(peer, reply.error)
    try:
        received = AdapterManifest.decode(reply.slice.manifest)
        if received.hash != digest or (manifest is not None and received != manifest):
            raise InvalidRequest(f"the manifest does not hash to {digest[:12]}")
        if start < end and (reply.slice.span.start, reply.slice.span.end) != (start, end):
            raise InvalidRequest("the slice is for other blocks than asked")
        tensors = await asyncio.to_thread(decode_slice, reply.slice, received, start, end) if start < end else {}
    except InvalidRequest as e:
        raise RemoteError(peer, f"sent a bad adapter slice: {e}") from None
    return received, tensors


def decode_slice(piece: pb.AdapterSlice, manifest: AdapterManifest, start: int, end: int) -> dict[str, torch.Tensor]:
    """The slice's matrices, each checked against the manifest's shape before decoding and its hash after."""
    tensors: dict[str, torch.Tensor] = {}
    for named in piece.tensors:
        digest = manifest.tensors.get(named.name)
        if digest is None or named.name in tensors:
            raise InvalidRequest(f"adapter tensor {named.name!r} is not in the manifest, or appears twice")
        if tuple(named.tensor.shape) != digest.shape or named.tensor.dtype != "float32" or named.tensor.codec != "none":
            raise InvalidRequest(f"adapter tensor {named.name!r} must be float32 of shape {digest.shape}, uncompressed")
        tensors[named.name] = decode(named.tensor)
    verify_slice(manifest, tensors, start, end)
    return tensors
