"""One download from one peer over `swarm.fetch`: a request, then chunks, bounded in size and time.

Whatever the peer sends is handed to `sink` chunk by chunk and never interpreted here; the caller
verifies it. A peer that sends more than `limit` bytes, an error reply, or nothing in time raises
RemoteError (PeerTimeout) naming it; bytes received before a failure have already gone to `sink`,
so the caller can continue from there with another peer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from swarm.errors import InvalidRequest, RemoteError
from swarm.limits import FETCH_CHUNK_BYTES, FETCH_CHUNK_TIMEOUT
from swarm.transport import P2P, open_stream, translate_errors
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.frames import read_message, to_frames
from swarm.wire.rpc import RPC_FETCH

_CHUNK_MESSAGE_BYTES = FETCH_CHUNK_BYTES + (1 << 16)  # a chunk's data plus its tags, or an error reply


class Oversized(RemoteError):
    """A peer sent more bytes than were asked for (or than the manifest allows)."""


async def download(
    p2p: P2P, peer_id: str, request: pb.FetchRequest, limit: int, sink: Callable[[bytes], None],
    timeout: float = FETCH_CHUNK_TIMEOUT,
) -> int:
    """Stream the answer to `request` from the peer into `sink`; return the number of bytes received."""

    async def requests() -> AsyncIterator[pb.Frame]:
        for frame in to_frames(request):
            yield frame

    received = 0
    with translate_errors(peer_id, RPC_FETCH):
        frames = await open_stream(p2p, peer_id, RPC_FETCH, requests(), timeout)
        while True:
            try:
                chunk = await asyncio.wait_for(read_message(frames, pb.FetchChunk, _CHUNK_MESSAGE_BYTES), timeout)
            except InvalidRequest as e:  # the peer's frames, not our request, are malformed
                raise RemoteError(peer_id, f"sent a malformed reply: {e}") from None
            if chunk is None:
                return received
            if chunk.HasField("error"):
                raise RemoteError(peer_id, f"refused to share: {chunk.error.message[:200]}")
            if received + len(chunk.data) > limit:
                raise Oversized(peer_id, f"sent more than the {limit} bytes asked for")
            received += len(chunk.data)
            sink(chunk.data)
