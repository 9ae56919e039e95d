"""Sharing this server's model files with peers over `swarm.fetch` (the other side of swarm/fetch/).

It sends the manifest, config.json, the tokenizer files the manifest lists, and byte ranges of the
tensors it holds as stored in its safetensors files, in chunks of FETCH_CHUNK_BYTES. Nothing else
of the folder can be named: a file request must be one of those names, a tensor one the manifest
lists and a header holds with the manifest's dtype and shape. It shares whatever it holds, not only
the blocks it serves (a full checkpoint shares every part). The caller verifies every byte, so the
server does not hash what it sends; per-peer limits and the request deadline apply as to any request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from swarm.errors import ConfigError, InvalidRequest, LimitExceeded
from swarm.limits import FETCH_CHUNK_BYTES, MAX_FETCHED_FILE_BYTES
from swarm.manifest import Manifest, safetensors_header, tensor_nbytes
from swarm.transport import P2P, caller_of
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.frames import read_message, read_until_end, to_frames
from swarm.wire.rpc import RPC_FETCH
from swarm.server.peer_limits import PeerGovernor

logger = logging.getLogger(__name__)

MAX_FETCH_REQUEST_BYTES = 1 << 16


class FetchService:
    def __init__(self, *, checkpoint: Path, manifest: Manifest, governor: PeerGovernor, request_timeout: float):
        self.checkpoint = checkpoint
        self.manifest = manifest
        self.governor = governor
        self.request_timeout = request_timeout
        self.tensors: dict[str, tuple[Path, int, int]] = {}  # name -> (file, where its bytes start, how many)

    def index(self) -> set[str]:
        """(Re)read the folder's safetensors headers; return the parts ("client", "block:N") held whole."""
        tensors = {}
        for path in sorted(self.checkpoint.glob("*.safetensors")):
            try:
                header, data_start = safetensors_header(path)
            except ConfigError as e:
                logger.warning("not sharing %s: %s", path.name, e)
                continue
            for name, info in header.items():
                entry = self.manifest.tensors.get(name)
                if entry is None or not isinstance(info, dict) or info.get("dtype") != entry.dtype:
                    continue
                begin, end = info.get("data_offsets", (0, -1))
                if tuple(info.get("shape", ())) == entry.shape and end - begin == tensor_nbytes(name, entry):
                    tensors[name] = (path, data_start + begin, end - begin)
        self.tensors = tensors
        held = {entry.part for entry in self.manifest.tensors.values()}
        return {part for part in held if all(name in tensors for name in self.manifest.tensors_of(part))}

    async def register(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(RPC_FETCH, self.rpc_fetch, pb.Frame, stream_input=True, stream_output=True)

    async def rpc_fetch(self, frames: AsyncIterator[pb.Frame], context: object) -> AsyncIterator[pb.Frame]:
        try:
            with self.governor.request(caller_of(context)):  # type: ignore[arg-type]
                try:
                    request = await asyncio.wait_for(read_message(frames, pb.FetchRequest, MAX_FETCH_REQUEST_BYTES),
                                                     self.request_timeout)
                except TimeoutError:
                    raise LimitExceeded(f"the request did not arrive within {self.request_timeout:g} s (--request-timeout)") from None
                if request is None:
                    raise InvalidRequest("empty fetch request")
                async for data in self._chunks(request):
                    for frame in to_frames(pb.FetchChunk(data=data)):
                        yield frame
        except Exception as e:
            if isinstance(e, InvalidRequest):
                logger.info("rejected fetch request: %s", e)
                error = pb.Error(kind=pb.Error.INVALID_REQUEST, message=str(e))
            else:
                logger.exception("fetch failed")
                error = pb.Error(kind=pb.Error.INTERNAL, message=f"{type(e).__name__}")
            for frame in to_frames(pb.FetchChunk(error=error)):
                yield frame
        await read_until_end(frames)

    async def _chunks(self, request: pb.FetchRequest) -> AsyncIterator[bytes]:
        if request.model_id != self.manifest.model_id:
            raise InvalidRequest(f"this server shares model {self.manifest.model_id}, not {request.model_id[:80]!r}")
        what = request.WhichOneof("what")
        if what == "manifest":
            data = self.manifest.to_json().encode()
            for offset in range(0, len(data), FETCH_CHUNK_BYTES):
                yield data[offset : offset + FETCH_CHUNK_BYTES]
        elif what == "file":
            async for data in self._file_chunks(request.file):
                yield data
        elif what == "tensor":
            async for data in self._tensor_chunks(request.tensor.name, request.tensor.offset, request.tensor.length):
                yield data
        else:
            raise InvalidRequest("a fetch request must ask for the manifest, a file or a tensor")

    async def _file_chunks(self, name: str) -> AsyncIterator[bytes]:
        if name != "config.json" and name not in self.manifest.tokenizer:
            raise InvalidRequest(f"{name[:80]!r} is not a file this server shares (config.json or the manifest's tokenizer files)")
        path = self.checkpoint / name
        if Path(name).name != name or not path.is_file() or path.stat().st_size > MAX_FETCHED_FILE_BYTES:
            raise InvalidRequest(f"this server does not hold {name}")
        data = await asyncio.to_thread(path.read_bytes)
        for offset in range(0, len(data), FETCH_CHUNK_BYTES):
            yield data[offset : offset + FETCH_CHUNK_BYTES]

    async def _tensor_chunks(self, name: str, offset: int, length: int) -> AsyncIterator[bytes]:
        """Bytes offset:offset+length of the tensor as stored, read from disk a chunk at a time."""
        if name not in self.tensors:
            raise InvalidRequest(f"this server does not share tensor {name[:120]!r}")
        path, start, size = self.tensors[name]
        if offset + length > size:
            raise InvalidRequest(f"bytes {offset}:{offset + length} are outside tensor {name} ({size} bytes)")
        end = offset + length
        while offset < end:
            count = min(FETCH_CHUNK_BYTES, end - offset)
            yield await asyncio.to_thread(_read, path, start + offset, count)
            offset += count


def _read(path: Path, position: int, count: int) -> bytes:
    with path.open("rb") as file:
        file.seek(position)
        return file.read(count)
