"""Adapters held by this server for its own blocks, addressed by the hash of their manifest.

Each adapter is kept as its manifest and the verified float32 matrices of this server's blocks,
within a byte budget (least recently used out first) and a per-adapter size cap. It also keeps
the publishers' signed name records it was handed (bounded), first come first served per name:
a record for a name this server already carries under another publisher's key is refused.

This module only keeps and checks; fetching and the RPCs are in adapter_service.py.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import torch

from swarm.adapter_manifest import AdapterManifest, split_name
from swarm.adapter_records import MAX_NAMES_PER_SERVER, AdapterName
from swarm.errors import InvalidRequest, LimitExceeded
from swarm.server.adapters import ParsedAdapter, linear_at
from swarm.server.span_runner import SpanRunner

logger = logging.getLogger(__name__)

MAX_ANNOUNCED = 32  # adapter hashes listed in this server's record (the most recently used)


@dataclasses.dataclass
class HeldAdapter:
    manifest: AdapterManifest
    start: int  # the blocks whose matrices are held: every matrix of the manifest in [start, end)
    end: int
    tensors: dict[str, torch.Tensor]  # by wire name, float32: A (rank, in), B (out, rank)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def covers(self, start: int, end: int) -> bool:
        """Whether the matrices of blocks [start, end) are all here."""
        needed = self.manifest.names_in(start, end)
        return all(name in self.tensors for name in needed)

    def parsed(self, start: int, end: int) -> ParsedAdapter:
        """The adapter for blocks [start, end), as the hooks of server/adapters.py apply it (never trained)."""
        lora, names = {}, {}
        for name in self.manifest.names_in(start, end):
            block, path, kind = split_name(name)
            names[(block, path, kind)] = name
        for (block, path, kind), name in names.items():
            if kind == "lora_A":
                lora[(block, path)] = (self.tensors[name], self.tensors[names[(block, path, "lora_B")]])
        return ParsedAdapter(self.manifest.scaling, self.manifest.dropout, lora, names, None, frozen=True)


def check_fits(manifest: AdapterManifest, runner: SpanRunner, start: int, end: int, max_rank: int, base: str) -> None:
    """InvalidRequest naming the problem unless the adapter's matrices of blocks [start, end) fit these blocks."""
    if manifest.base != base:
        raise InvalidRequest(f"the adapter is for base model {manifest.base}, this server serves {base}")
    if manifest.rank > max_rank:
        raise LimitExceeded(f"adapter rank {manifest.rank} exceeds this server's limit of {max_rank} (--max-lora-rank)")
    pairs: dict[tuple[int, str], set[str]] = {}
    for name in manifest.names_in(start, end):
        block, path, kind = split_name(name)
        linear = linear_at(runner, block, path, name)
        expected = (manifest.rank, linear.in_features) if kind == "lora_A" else (linear.out_features, manifest.rank)
        if manifest.tensors[name].shape != expected:
            raise InvalidRequest(f"adapter tensor {name!r} has shape {manifest.tensors[name].shape}, expected {expected}")
        pairs.setdefault((block, path), set()).add(kind)
    for (block, path), kinds in pairs.items():
        if kinds != {"lora_A", "lora_B"}:
            raise InvalidRequest(f"adapter block {block} {path}: LoRA needs both lora_A and lora_B")


class AdapterStore:
    """Held adapters within `budget_bytes` (LRU), each at most `max_adapter_bytes`; and name records."""

    def __init__(self, budget_bytes: int, max_adapter_bytes: int):
        self.budget_bytes = budget_bytes
        self.max_adapter_bytes = max_adapter_bytes
        self._held: collections.OrderedDict[str, HeldAdapter] = collections.OrderedDict()
        self._names: collections.OrderedDict[str, AdapterName] = collections.OrderedDict()
        # what hashes() returns, replaced whole on every change: the announcer reads it from another thread
        self._recent: tuple[str, ...] = ()
        self.version = 0  # bumped on every change, so the announcer knows when to publish again

    def get(self, digest: str) -> HeldAdapter | None:
        held = self._held.get(digest)
        if held is not None:
            self._held.move_to_end(digest)
            self._recent = tuple(reversed(self._held))[:MAX_ANNOUNCED]
        return held

    def check_size(self, nbytes: int) -> None:
        if nbytes > min(self.max_adapter_bytes, self.budget_bytes):
            raise LimitExceeded(f"an adapter slice of {nbytes} bytes exceeds this server's limit of "
                                f"{min(self.max_adapter_bytes, self.budget_bytes)} bytes (--max-adapter-mb, --adapter-store-mb)")

    def put(self, held: HeldAdapter) -> None:
        """Keep `held` (already verified), evicting the least recently used adapters to make room."""
        self.check_size(held.nbytes)
        digest = held.manifest.hash
        old = self._held.pop(digest, None)
        if old is not None and old.start <= held.start and held.end <= old.end:
            held = old  # already held, at least these blocks
        while self._held and self.bytes_used() + held.nbytes > self.budget_bytes:
            evicted, _ = self._held.popitem(last=False)
            logger.info("evicted adapter %s (least recently used) to stay within the adapter budget", evicted[:12])
        self._held[digest] = held
        self._recent = tuple(reversed(self._held))[:MAX_ANNOUNCED]
        self.version += 1
        logger.info("holding adapter %s for blocks %d:%d (%d bytes)", digest[:12], held.start, held.end, held.nbytes)

    def bytes_used(self) -> int:
        return sum(held.nbytes for held in self._held.values())

    def hashes(self) -> tuple[str, ...]:
        """The held adapters to announce, most recently used first (at most MAX_ANNOUNCED)."""
        return self._recent

    def check_name(self, record: AdapterName) -> None:
        """InvalidRequest if this server carries the name under another publisher's key."""
        current = self._names.get(record.name)
        if current is not None and current.publisher != record.publisher:
            raise InvalidRequest(f"adapter name {record.name!r} belongs to publisher {current.publisher}; "
                                 f"a record signed by {record.publisher} cannot add versions to it")

    def put_name(self, record: AdapterName) -> None:
        self.check_name(record)
        current = self._names.get(record.name)
        if current is not None and len(current.versions) >= len(record.versions):
            return  # an older or equal document of the same publisher
        self._names[record.name] = record
        self._names.move_to_end(record.name)
        while len(self._names) > MAX_NAMES_PER_SERVER:
            self._names.popitem(last=False)
        self.version += 1

    def names(self) -> list[AdapterName]:
        return list(self._names.values())
