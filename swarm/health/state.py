"""A snapshot of the swarm as the DHT shows it: models, their servers, coverage and rejected records.

`/api/v1/state` returns `SwarmState` as JSON with this schema:

    {
      "updated_at": float,                 # UNIX time of the DHT read
      "models": [{
        "dht_prefix": str, "model_type": str, "num_blocks": int,
        "healthy": bool,                   # every block has at least one online server
        "replicas": [int, ...],            # online servers per block
        "missing": [[start, end], ...],    # half-open ranges no online server holds
        "client_part_peers": [str, ...],   # online servers that share the client part (embeddings, norm, head)
        "invalid_count": int,              # records dropped in this model's keys (failed checks or unsigned)
        "invalid_records": {peer_id: reason},  # some of them (at most 32): the peer id each names, and why
        "adapters": [{                     # adapters published by name for this model (swarm/adapter_records.py)
          "name": str, "publisher": str,   # peer id of the key that signs the name
          "versions": [{"version": int, "hash": str, "parents": [str], "method": str, "provenance": str, "created": float,
                        "holders": [peer_id],          # online servers whose records list the hash
                        "coverage": [int, ...]}, ...]  # holders per block (0 where no holder serves the block)
        }, ...],
        "servers": [{
          "peer_id": str, "public_name": str, "version": str, "state": "joining"|"online"|"offline",
          "start": int, "end": int, "throughput": float, "inference_rps": float,
          "torch_dtype": str, "quant_type": str, "adapters": [str], "cache_tokens_left": int,
          "reachability": "direct"|"relay", "next_pings": {peer_id: seconds},
          "shares": [str, ...],            # what it shares over swarm.fetch: "client" and block ranges "A:B"
          "probe_ms": float | null         # this monitor's info call round trip; null: no answer
        }, ...]
      }, ...],
      "invalid_index_records": int         # model index entries dropped before they could name a model
    }

A model appears with the number of blocks that its own servers state (swarm.records.agreed_model),
so an index entry from a peer that serves nothing of it can neither add blocks nor remove them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from swarm.adapter_dht import fetch_all_adapter_names
from swarm.adapter_records import AdapterName
from swarm.dht import DHT, fetch_model_index, fetch_records_at
from swarm.transport import P2P, ping
from swarm.records import CLIENT_PART, Rejections, ServerRecord, ServerState, agreed_model, block_ranges


PROBE_TIMEOUT = 3.0  # seconds an info call may take before the server counts as not answering


@dataclasses.dataclass(frozen=True)
class ServerView:
    peer_id: str
    public_name: str
    version: str
    state: str
    start: int
    end: int
    throughput: float
    inference_rps: float
    torch_dtype: str
    quant_type: str
    adapters: list[str]
    cache_tokens_left: int
    reachability: str
    next_pings: dict[str, float]
    shares: list[str]
    probe_ms: float | None = None  # round trip of an info call from this monitor; None: did not answer

    @classmethod
    def of(cls, peer_id: str, record: ServerRecord) -> ServerView:
        return cls(
            peer_id=peer_id, public_name=record.public_name, version=record.version, state=record.state.value,
            start=record.start, end=record.end, throughput=record.throughput, inference_rps=record.inference_rps,
            torch_dtype=record.torch_dtype, quant_type=record.quant_type, adapters=list(record.adapters),
            cache_tokens_left=record.cache_tokens_left, reachability=record.reachability, next_pings=dict(record.next_pings),
            shares=list(record.shares),
        )


@dataclasses.dataclass(frozen=True)
class AdapterVersionView:
    version: int
    hash: str
    parents: list[str]
    method: str
    provenance: str
    created: float
    holders: list[str]
    coverage: list[int]


@dataclasses.dataclass(frozen=True)
class AdapterView:
    name: str
    publisher: str
    versions: list[AdapterVersionView]

    @classmethod
    def of(cls, record: AdapterName, servers: dict[str, ServerRecord], num_blocks: int) -> AdapterView:
        versions = []
        for version in reversed(record.versions):
            holders = sorted(peer for peer, server in servers.items()
                             if server.state == ServerState.ONLINE and version.hash in server.adapters)
            coverage = [sum(servers[peer].start <= block < servers[peer].end for peer in holders) for block in range(num_blocks)]
            versions.append(AdapterVersionView(version.version, version.hash, list(version.parents), version.method,
                                               version.provenance, version.created, holders, coverage))
        return cls(record.name, record.publisher, versions)


@dataclasses.dataclass(frozen=True)
class ModelView:
    dht_prefix: str
    model_type: str
    num_blocks: int
    healthy: bool
    replicas: list[int]
    missing: list[tuple[int, int]]
    invalid_count: int
    invalid_records: dict[str, str]
    servers: list[ServerView]
    client_part_peers: list[str]
    adapters: list[AdapterView] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class SwarmState:
    updated_at: float
    models: list[ModelView]
    invalid_index_records: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


async def probe_servers(state: SwarmState, p2p: P2P) -> SwarmState:
    """The same state with each server's answer to an info call (round trip in ms, or None)."""
    peers = {server.peer_id for model in state.models for server in model.servers}
    rtts = dict(zip(peers, await asyncio.gather(*(ping(p2p, peer, PROBE_TIMEOUT) for peer in peers))))
    models = [
        dataclasses.replace(model, servers=[dataclasses.replace(s, probe_ms=_milliseconds(rtts.get(s.peer_id))) for s in model.servers])
        for model in state.models
    ]
    return dataclasses.replace(state, models=models)


def _milliseconds(seconds: float | None) -> float | None:
    return seconds * 1e3 if seconds is not None else None


def collect_state(dht: DHT) -> SwarmState:
    """Read the model index and every model's block records (blocking: DHT round trips)."""
    index_rejected = Rejections()
    models = []
    for prefix, claims in sorted(fetch_model_index(dht, index_rejected).items()):
        rejected = Rejections()
        # Claims are bounded (MAX_NUM_BLOCKS), so reading up to the largest one costs a bounded read.
        blocks = fetch_records_at(dht, prefix, range(max(claim.num_blocks for claim in claims.values())), rejected)
        servers: dict[str, ServerRecord] = {}
        for records in blocks.values():
            for peer, record in records.items():
                servers.setdefault(peer, record)
        model = agreed_model(claims, servers, rejected)
        if model is None:
            index_rejected.count += rejected.count
            continue
        blocks = {index: blocks[index] for index in range(model.num_blocks)}
        servers = {peer: record for peer, record in servers.items() if record.end <= model.num_blocks}
        replicas = [sum(r.state == ServerState.ONLINE for r in blocks[i].values()) for i in range(model.num_blocks)]
        missing = block_ranges([index for index, count in enumerate(replicas) if count == 0])
        views = sorted((ServerView.of(peer, record) for peer, record in servers.items()), key=lambda v: (v.start, v.peer_id))
        client_part_peers = sorted(peer for peer, record in servers.items()
                                   if record.state == ServerState.ONLINE and CLIENT_PART in record.shares)
        names = fetch_all_adapter_names(dht, prefix, rejected)
        adapters = [AdapterView.of(record, servers, model.num_blocks) for _, record in sorted(names.items())]
        models.append(ModelView(prefix, model.model_type, model.num_blocks, not missing, replicas, missing,
                                rejected.count, rejected.reasons, views, client_part_peers, adapters))
    return SwarmState(time.time(), models, index_rejected.count)
