"""Adapters in the swarm, seen from a client: names and versions, pulling, publishing.

- `resolve("NAME[@VERSION]")`: the name's signed record (swarm.adapter_records) and one version.
- `pull(hash)`: the manifest and every matrix, from the servers whose records list the hash,
  each slice verified against the hash (swarm.adapter_transfer).
- `publish(...)`: hands each server the slice for its blocks (at least REPLICAS holders per block
  where the swarm has them) with the name record signed by the publisher's key, which only that
  key can extend.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import msgpack
import torch

from swarm import adapter_dht
from swarm.adapter_manifest import AdapterManifest
from swarm.adapter_records import AdapterName, AdapterVersion, check_name
from swarm.adapter_transfer import SLICE_OVERHEAD_BYTES, fetch_slice, slice_message
from swarm.errors import ConfigError, InvalidRequest, RemoteError
from swarm.limits import STEP_TIMEOUT
from swarm.model_source import cache_root
from swarm.records import RecordSigner, ServerRecord, ServerState
from swarm.transport import P2P, call_stream, raise_for_error
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.rpc import RPC_ADAPTER_STORE
from swarm.client.event_loop import run_sync
from swarm.client.swarm_client import SwarmClient

logger = logging.getLogger(__name__)

REPLICAS = 2  # holders per block a publish aims for
MAX_PULL_BYTES = 1 << 30  # the largest adapter a client pulls
PUBLISH_LISTING_TIMEOUT = 30.0  # seconds a publish waits for the DHT to list what it stored
SPEC_PREFIX = "swarm:"


@dataclasses.dataclass(frozen=True)
class Publication:
    record: AdapterName
    version: AdapterVersion
    holders: dict[str, tuple[int, int]]  # peer id -> blocks it now holds


def parse_spec(spec: str) -> tuple[str, int | None]:
    """("NAME", VERSION or None) of "NAME[@VERSION]" (with or without the "swarm:" prefix)."""
    name, _, version = spec.removeprefix(SPEC_PREFIX).partition("@")
    check_name(name)
    if version and not version.isdigit():
        raise ConfigError(f"adapter version {version!r} must be a number, as in NAME@2")
    return name, int(version) if version else None


def default_identity_path() -> Path:
    """Where the publisher key lives unless told otherwise."""
    return cache_root() / "publisher.key"


def load_signer(identity_path: str | Path) -> RecordSigner:
    """The publisher's key (a libp2p RSA identity file, created if missing), which signs name records."""
    path = Path(identity_path).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
        logger.info("created a new publisher key at %s", path)
    return RecordSigner(path.read_bytes())


class AdapterRegistry:
    def __init__(self, client: SwarmClient):
        self.client = client

    @property
    def base(self) -> str:
        return self.client.dht_prefix

    def record(self, name: str) -> AdapterName | None:
        return adapter_dht.fetch_adapter_name(self.client.dht, self.base, check_name(name))

    def records(self) -> dict[str, AdapterName]:
        return adapter_dht.fetch_all_adapter_names(self.client.dht, self.base)

    def resolve(self, spec: str) -> tuple[AdapterName, AdapterVersion]:
        name, number = parse_spec(spec)
        record = self.record(name)
        if record is None:
            raise ConfigError(f"no adapter named {name!r} is held by any server of {self.base} (publish it first)")
        return record, record.version(number)

    def holders(self, digest: str) -> dict[str, ServerRecord]:
        """Online servers whose records list the adapter."""
        blocks = run_sync(self.client.fetch_blocks())
        return {peer: record for records in blocks for peer, record in records.items()
                if digest in record.adapters and record.state == ServerState.ONLINE}

    def manifest(self, digest: str) -> AdapterManifest:
        """The adapter's manifest from one of its holders, verified against the hash."""
        return self._from_holders(digest, 0, 0, None)[0]

    def pull(self, digest: str) -> tuple[AdapterManifest, dict[str, torch.Tensor]]:
        """Every matrix of the adapter, verified against its hash."""
        manifest = self.manifest(digest)
        if manifest.nbytes() > MAX_PULL_BYTES:
            raise InvalidRequest(f"adapter {digest[:12]} has {manifest.nbytes()} bytes, more than {MAX_PULL_BYTES}")
        tensors: dict[str, torch.Tensor] = {}
        blocks = manifest.blocks()
        position, last = blocks[0], blocks[-1] + 1
        holders = self.holders(digest)
        while position < last:
            reach = max((r.end for r in holders.values() if r.start <= position < r.end), default=None)
            if reach is None:
                raise InvalidRequest(f"no online server holds block {position} of adapter {digest[:12]}")
            end = min(reach, last)
            tensors.update(self._from_holders(digest, position, end, manifest)[1])
            position = end
        return manifest, tensors

    def _from_holders(self, digest: str, start: int, end: int,
                      manifest: AdapterManifest | None) -> tuple[AdapterManifest, dict[str, torch.Tensor]]:
        holders = {p: r for p, r in self.holders(digest).items() if start == end or (r.start <= start and end <= r.end)}
        if not holders:
            raise ConfigError(f"no online server holds adapter {digest[:12]}" + (f" for blocks {start}:{end}" if start < end else ""))
        errors = []
        limit = (manifest.nbytes(start, end) if manifest is not None else 0) + SLICE_OVERHEAD_BYTES
        for peer in holders:
            try:
                return run_sync(fetch_slice(self.client.p2p, peer, digest, start, end, manifest, limit))
            except (RemoteError, InvalidRequest) as e:
                logger.warning("could not fetch adapter %s from %s: %s", digest[:12], peer[-8:], e)
                errors.append(str(e))
        raise RemoteError(next(iter(holders)), f"no holder sent adapter {digest[:12]}: {errors[-1]}")

    def publish(self, manifest: AdapterManifest, tensors: dict[str, torch.Tensor], name: str, signer: RecordSigner, *,
                parents: tuple[str, ...] = (), method: str = "trained", provenance: str = "") -> Publication:
        """Place the adapter's slices on the servers of its blocks and sign a new version of `name`."""
        check_name(name)
        if manifest.base != self.base:
            raise ConfigError(f"the adapter is for base model {manifest.base}, this swarm serves {self.base}")
        current = self.record(name)
        if current is not None and current.publisher != signer.peer_id:
            raise ConfigError(f"adapter name {name!r} belongs to publisher {current.publisher}; your key is {signer.peer_id} "
                              "(pick another name)")
        record = current or AdapterName(name, self.base, ())
        digest = manifest.hash
        if current is not None and current.latest().hash == digest:
            signed = current  # republishing the same content: place it again, no new version
        else:
            signed = record.with_version(digest, parents, method, provenance, time.time()).sign(signer)
        holders = self._place(manifest, tensors, signed)
        self._await_listed(name, digest, holders)
        logger.info("published %s version %d (%s) on %d servers", name, signed.latest().version, digest[:12], len(holders))
        return Publication(signed, signed.latest(), holders)

    def _await_listed(self, name: str, digest: str, holders: dict[str, tuple[int, int]]) -> None:
        """Wait (bounded) until the DHT shows `name` at `digest` and the servers that stored it as holders:
        they announce it a moment after storing, and a `load_adapter("swarm:NAME")` right after a publish
        must find it. Past the bound the adapter is stored all the same; a warning says it is not listed yet."""
        deadline = time.monotonic() + PUBLISH_LISTING_TIMEOUT
        while True:
            record = self.record(name)
            if record is not None and record.latest().hash == digest and holders.keys() <= self.holders(digest).keys():
                return
            if time.monotonic() > deadline:
                logger.warning("%s (%s) is stored on %d servers but the DHT does not list it yet after %.0f s",
                               name, digest[:12], len(holders), PUBLISH_LISTING_TIMEOUT)
                return
            time.sleep(0.25)

    def _place(self, manifest: AdapterManifest, tensors: dict[str, torch.Tensor], record: AdapterName) -> dict[str, tuple[int, int]]:
        blocks = run_sync(self.client.fetch_blocks())
        needed = manifest.blocks()
        servers: dict[str, ServerRecord] = {}
        for index in needed:
            for peer, server in blocks[index].items():
                if server.state == ServerState.ONLINE and self.client.server_filter().usable(peer, server):
                    servers[peer] = server
        envelope = msgpack.packb(record.envelope)
        stored: dict[str, tuple[int, int]] = {}
        copies = {index: 0 for index in needed}
        refusals: list[str] = []
        # servers covering the most still under-replicated blocks first
        for peer, server in sorted(servers.items(), key=lambda item: -(item[1].end - item[1].start)):
            span = range(max(server.start, needed[0]), min(server.end, needed[-1] + 1))
            if not span or all(copies.get(i, REPLICAS) >= REPLICAS for i in span):
                continue
            request = pb.AdapterStoreRequest(slice=slice_message(manifest, tensors, span.start, span.stop),
                                             name_record=envelope, name=record.name)
            try:
                run_sync(_store(self.client.p2p, peer, request))
            except InvalidRequest as e:  # the server refuses this adapter (rank, modules, base, name owner): say why
                refusals.append(str(e))
                continue
            except RemoteError as e:
                logger.warning("server %s could not take the adapter: %s", peer[-8:], e)
                continue
            stored[peer] = (span.start, span.stop)
            for index in span:
                if index in copies:
                    copies[index] += 1
        uncovered = [index for index, count in copies.items() if count == 0]
        if uncovered:
            reason = f": {refusals[0]}" if refusals else ""
            raise InvalidRequest(f"no server took blocks {uncovered[0]}..{uncovered[-1]} of the adapter{reason}")
        return stored


async def _store(p2p: P2P, peer: str, request: pb.AdapterStoreRequest) -> None:
    reply = await call_stream(p2p, peer, RPC_ADAPTER_STORE, request, pb.AdapterStoreResponse, STEP_TIMEOUT, STEP_TIMEOUT)
    if reply.HasField("error"):
        raise_for_error(peer, reply.error)
