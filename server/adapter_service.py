"""Adapters held by servers: loading from peft folders, the fetch/store RPCs, fetching once from peers.

- `--adapters DIR...`: peft folders loaded at start (for this server's blocks only).
- `swarm.adapter_store`: a publisher hands this server the slice for its blocks and, optionally,
  the signed name record; both are checked (manifest hash, every tensor's hash, base model, rank
  and target modules against these blocks, size) before anything is kept.
- `swarm.adapter_fetch`: any peer gets the manifest and the matrices of the blocks it asks for.
- A request naming an adapter by hash that this server lacks makes it fetch its blocks' slice from
  peers whose records list that hash (one fetch per hash at a time; concurrent requests wait for it).
- The held hashes go into this server's record; the name records it carries go to the DHT
  (swarm.adapter_dht) with every refresh, so names outlive their publishers' sessions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import torch

from swarm import dht as swarm_dht
from swarm.adapter_dht import declare_adapter_names
from swarm.adapter_files import read_peft_folder
from swarm.adapter_manifest import AdapterManifest, check_hash
from swarm.adapter_transfer import SLICE_OVERHEAD_BYTES, decode_slice, fetch_slice, slice_message
from swarm.adapter_records import MAX_NAME_RECORD_BYTES, check_name, open_name_record
from swarm.errors import InvalidRecord, InvalidRequest, RemoteError
from swarm.limits import RECORD_EXPIRATION, RECORD_REFRESH_PERIOD
from swarm.records import RecordSigner
from swarm.transport import P2P, caller_of
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.frames import read_message, read_until_end, to_frames
from swarm.wire.rpc import RPC_ADAPTER_FETCH, RPC_ADAPTER_STORE
from swarm.server.adapter_store import AdapterStore, HeldAdapter, check_fits
from swarm.server.adapters import ParsedAdapter
from swarm.server.peer_limits import PeerGovernor
from swarm.server.span_runner import SpanRunner

logger = logging.getLogger(__name__)

_REQUEST_BYTES = 1 << 16  # a fetch request is a hash and a span
MAX_FETCH_ATTEMPTS = 4  # holders tried per piece: records that list a hash falsely cost at most this many timeouts


class AdapterService:
    def __init__(self, *, store: AdapterStore, runner: Callable[[], SpanRunner], base: str, max_rank: int,
                 dht: swarm_dht.DHT, signer: RecordSigner, peer_id: str, request_timeout: float, governor: PeerGovernor):
        self.store = store
        self.runner = runner  # the current span runner (it changes when the server moves)
        self.base = base
        self.max_rank = max_rank
        self.dht = dht
        self.signer = signer
        self.peer_id = peer_id
        self.request_timeout = request_timeout
        self.governor = governor  # fetches and stores count as requests in progress of their peer
        self.p2p: P2P | None = None
        self._fetching: dict[str, asyncio.Future[HeldAdapter]] = {}
        self._announced_version = -1

    async def register(self, p2p: P2P) -> None:
        self.p2p = p2p
        await p2p.add_protobuf_handler(RPC_ADAPTER_FETCH, self.rpc_fetch, pb.Frame, stream_input=True, stream_output=True)
        await p2p.add_protobuf_handler(RPC_ADAPTER_STORE, self.rpc_store, pb.Frame, stream_input=True, stream_output=True)

    def load_folder(self, directory: Path, layer_key_prefix: str) -> str:
        """Hold a local peft folder's matrices of this server's blocks; returns the adapter's hash."""
        runner = self.runner()
        manifest, tensors = read_peft_folder(directory, self.base, layer_key_prefix, self.store.max_adapter_bytes)
        check_fits(manifest, runner, runner.start, runner.end, self.max_rank, self.base)
        mine = {name: tensors[name] for name in manifest.names_in(runner.start, runner.end)}
        self.store.put(HeldAdapter(manifest, runner.start, runner.end, mine))
        logger.info("loaded adapter %s from %s", manifest.hash, directory)
        return manifest.hash

    # --- serving requests that name an adapter -------------------------------------------------------

    async def resolve(self, digest: str, start: int, end: int) -> ParsedAdapter:
        """The held adapter `digest` for blocks [start, end), fetched from peers first if this server lacks it."""
        return (await self.held(digest, start, end)).parsed(start, end)

    async def held(self, digest: str, start: int, end: int) -> HeldAdapter:
        """The held adapter `digest`, covering blocks [start, end), fetched from peers first if this server lacks it."""
        check_hash(digest)
        held = self.store.get(digest)
        if held is None or not held.covers(start, end):
            held = await self._fetch_once(digest)
        if not held.covers(start, end):
            raise InvalidRequest(f"adapter {digest[:12]} is held here for blocks {held.start}:{held.end} only")
        return held

    async def _fetch_once(self, digest: str) -> HeldAdapter:
        pending = self._fetching.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(digest))
            self._fetching[digest] = pending
            pending.add_done_callback(lambda _: self._fetching.pop(digest, None))
        return await asyncio.shield(pending)

    async def _fetch(self, digest: str) -> HeldAdapter:
        """This server's blocks of adapter `digest`, from the peers whose records list it."""
        runner = self.runner()
        start, end = runner.start, runner.end
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, swarm_dht.fetch_records_at, self.dht, self.base, range(start, end))
        holders = {peer: record for records in found.values() for peer, record in records.items()
                   if digest in record.adapters and peer != self.peer_id}
        if not holders:
            raise InvalidRequest(f"no server holds adapter {digest[:12]} for blocks {start}:{end} "
                                 "(publish it, or start a server with --adapters)")
        manifest = None
        for peer in list(holders)[:MAX_FETCH_ATTEMPTS]:
            try:
                manifest = (await self._fetch_slice(peer, digest, 0, 0, None))[0]
                break
            except (RemoteError, InvalidRequest) as e:
                logger.warning("could not fetch the manifest of adapter %s from %s: %s", digest[:12], peer[-8:], e)
        if manifest is None:
            raise InvalidRequest(f"no holder of adapter {digest[:12]} sent a valid manifest")
        check_fits(manifest, runner, start, end, self.max_rank, self.base)
        self.store.check_size(manifest.nbytes(start, end))
        tensors: dict[str, torch.Tensor] = {}
        position = start
        while position < end:
            if not manifest.names_in(position, end):
                break
            # the holders of this block, the one reaching furthest first
            candidates = sorted((p for p, r in holders.items() if r.start <= position < r.end), key=lambda p: -holders[p].end)
            for peer in candidates[:MAX_FETCH_ATTEMPTS]:
                hop_end = min(end, holders[peer].end)
                try:
                    tensors.update((await self._fetch_slice(peer, digest, position, hop_end, manifest))[1])
                    position = hop_end
                    break
                except (RemoteError, InvalidRequest) as e:
                    logger.warning("could not fetch adapter %s blocks %d:%d from %s: %s", digest[:12], position, hop_end, peer[-8:], e)
            else:
                raise InvalidRequest(f"no server could send adapter {digest[:12]} for block {position}")
        held = HeldAdapter(manifest, start, end, tensors)
        self.store.put(held)
        logger.info("fetched adapter %s for blocks %d:%d from peers", digest[:12], start, end)
        return held

    async def _fetch_slice(self, peer: str, digest: str, start: int, end: int,
                           manifest: AdapterManifest | None) -> tuple[AdapterManifest, dict[str, torch.Tensor]]:
        assert self.p2p is not None, "register() first"
        limit = self.store.max_adapter_bytes + SLICE_OVERHEAD_BYTES
        return await fetch_slice(self.p2p, peer, digest, start, end, manifest, limit)

    # --- RPCs ------------------------------------------------------------------------------------------

    async def rpc_fetch(self, frames: AsyncIterator[pb.Frame], context: Any) -> AsyncIterator[pb.Frame]:
        try:
            with self.governor.request(caller_of(context)):
                response = await self._serve_fetch(frames)
        except Exception as e:  # noqa: BLE001 - every failure is this caller's reply
            response = pb.AdapterFetchResponse(error=_error(e))
        for frame in to_frames(response):
            yield frame
        await read_until_end(frames)

    async def _serve_fetch(self, frames: AsyncIterator[pb.Frame]) -> pb.AdapterFetchResponse:
        request = await asyncio.wait_for(read_message(frames, pb.AdapterFetchRequest, _REQUEST_BYTES), self.request_timeout)
        if request is None:
            raise InvalidRequest("empty adapter fetch request")
        held = self.store.get(check_hash(request.adapter_hash))
        if held is None:
            raise InvalidRequest(f"adapter {request.adapter_hash[:12]} is not held here")
        start, end = request.span.start, request.span.end
        if start < end and not (held.start <= start and end <= held.end):
            raise InvalidRequest(f"adapter {request.adapter_hash[:12]} is held here for blocks {held.start}:{held.end} only")
        return pb.AdapterFetchResponse(slice=slice_message(held.manifest, held.tensors, start, end))

    async def rpc_store(self, frames: AsyncIterator[pb.Frame], context: Any) -> AsyncIterator[pb.Frame]:
        try:
            limit = self.store.max_adapter_bytes + MAX_NAME_RECORD_BYTES + (2 << 20)
            with self.governor.request(caller_of(context)):
                request = await asyncio.wait_for(read_message(frames, pb.AdapterStoreRequest, limit), self.request_timeout)
                if request is None:
                    raise InvalidRequest("empty adapter store request")
                await self._store(request)
            response = pb.AdapterStoreResponse()
        except Exception as e:  # noqa: BLE001
            response = pb.AdapterStoreResponse(error=_error(e))
        for frame in to_frames(response):
            yield frame
        await read_until_end(frames)

    async def _store(self, request: pb.AdapterStoreRequest) -> None:
        """Check everything first (the name, the slice), then keep both: a refusal stores nothing."""
        runner = self.runner()
        record = None
        if request.name_record:
            record = _open_record(self.base, request.name, request.name_record)
            self.store.check_name(record)
        manifest = AdapterManifest.decode(request.slice.manifest)
        start, end = request.slice.span.start, request.slice.span.end
        if not (runner.start <= start < end <= runner.end):
            raise InvalidRequest(f"blocks {start}:{end} are not all served here (this server holds {runner.start}:{runner.end})")
        check_fits(manifest, runner, start, end, self.max_rank, self.base)
        self.store.check_size(manifest.nbytes(start, end))
        tensors = await asyncio.to_thread(decode_slice, request.slice, manifest, start, end)
        if record is not None and manifest.hash not in {v.hash for v in record.versions}:
            raise InvalidRequest(f"the name record of {record.name!r} has no version with hash {manifest.hash[:12]}")
        self.store.put(HeldAdapter(manifest, start, end, tensors))
        if record is not None:
            self.store.put_name(record)
        await self.announce_if_changed()

    # --- announcing --------------------------------------------------------------------------------------

    async def announce_if_changed(self) -> None:
        if self.store.version != self._announced_version:
            await self.announce()

    async def announce(self) -> None:
        """Put the name records this server carries into the DHT (its record's adapter list goes with the announcer)."""
        self._announced_version = self.store.version
        names = self.store.names()
        if names:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, declare_adapter_names, self.dht, self.signer, self.base, names, RECORD_EXPIRATION)

    async def run(self, stop: asyncio.Event, on_change: Callable[[], Awaitable[object]]) -> None:
        """Refresh the name records every period; tell the announcer at once when the held set changes."""
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + RECORD_REFRESH_PERIOD
        seen = self.store.version
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
            try:
                if self.store.version != seen:
                    seen = self.store.version
                    await on_change()
                if loop.time() >= next_refresh:
                    next_refresh = loop.time() + RECORD_REFRESH_PERIOD
                    await self.announce()
            except Exception as e:  # noqa: BLE001 - retried next period
                logger.warning("could not announce adapters: %s", e)


def _open_record(base: str, name: str, payload: bytes) -> Any:
    check_name(name)
    if len(payload) > MAX_NAME_RECORD_BYTES + 4096:
        raise InvalidRequest("the name record is too large")
    try:
        envelope = msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
        return open_name_record(base, name, envelope)
    except InvalidRecord as e:
        raise InvalidRequest(f"the name record of {name!r} is invalid: {e}") from None
    except Exception as e:  # noqa: BLE001 - msgpack raises several types on hostile bytes
        raise InvalidRequest(f"the name record of {name!r} is undecodable ({type(e).__name__})") from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise InvalidRequest(f"msgpack ext type {code}")


def _error(error: Exception) -> pb.Error:
    if isinstance(error, InvalidRequest):
        logger.info("refused an adapter request: %s", error)
        return pb.Error(kind=pb.Error.INVALID_REQUEST, message=str(error))
    if isinstance(error, TimeoutError):
        return pb.Error(kind=pb.Error.INVALID_REQUEST, message="the request did not arrive in time (--request-timeout)")
    logger.exception("adapter request failed")
    return pb.Error(kind=pb.Error.INTERNAL, message=f"{type(error).__name__}: {error}")
