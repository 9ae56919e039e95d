"""The DHT record contract: key format, the server record, and its validation.

One key per block, `"{dht_prefix}.{block_index}"`; under it, one subkey per server (the server's
peer id followed by its signing public key, so that only that server can write it). The value
is a small dict (hivemind msgpack-serializes it). Readers ignore fields they do not know, so
versions can mix, and drop records that fail validation instead of trusting them.

This module knows nothing about hivemind; swarm.dht stores and fetches these records.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math

import msgpack
from typing import Any

logger = logging.getLogger(__name__)

RECORD_VERSION = 1
MODEL_INDEX_KEY = "_swarm.models"


class ServerState(str, enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


class InvalidRecord(ValueError):
    """A record from the DHT that does not follow the schema; it is ignored, never trusted."""


def block_key(dht_prefix: str, block_index: int) -> str:
    return f"{dht_prefix}.{block_index}"


def block_ranges(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted block indices as half-open ranges of consecutive blocks, e.g. [1, 2, 5] -> [(1, 3), (5, 6)]."""
    ranges: list[tuple[int, int]] = []
    for index in indices:
        if ranges and ranges[-1][1] == index:
            ranges[-1] = (ranges[-1][0], index + 1)
        else:
            ranges.append((index, index + 1))
    return ranges


@dataclasses.dataclass(frozen=True)
class ServerRecord:
    """What a server announces under each block key of its span."""

    state: ServerState
    start: int  # first block held (global index)
    end: int  # one past the last block held
    throughput: float = 0.0  # forward tokens/s through one block (batched); 0 = not measured
    inference_rps: float = 0.0  # single-token decode steps/s through one block; 0 = not measured
    cache_tokens_left: int = 0  # attention-cache room, in tokens of one sequence
    torch_dtype: str = "float32"
    quant_type: str = "none"
    codecs: tuple[str, ...] = ("none",)
    adapters: tuple[str, ...] = ()
    version: str = ""
    public_name: str = ""
    reachability: str = "direct"  # "direct" | "relay"
    # Round trips (seconds) to servers that hold this server's `end` block, measured by this server.
    next_pings: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end):
            raise InvalidRecord(f"impossible span {self.start}:{self.end}")
        if self.throughput < 0 or self.inference_rps < 0 or self.cache_tokens_left < 0:
            raise InvalidRecord("negative throughput or cache size")

    def to_wire(self) -> dict[str, Any]:
        value = dataclasses.asdict(self)
        value["state"] = self.state.value
        value["codecs"] = list(self.codecs)
        value["adapters"] = list(self.adapters)
        value["next_pings"] = dict(self.next_pings)
        value["v"] = RECORD_VERSION
        return value

    @classmethod
    def from_wire(cls, value: Any) -> ServerRecord:
        """Validate a value read from the DHT; raise InvalidRecord if it breaks the schema."""
        if not isinstance(value, dict):
            raise InvalidRecord(f"record is a {type(value).__name__}, not a dict")
        fields: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in value:
                if field.default is dataclasses.MISSING:
                    raise InvalidRecord(f"record lacks {field.name!r}")
                continue
            fields[field.name] = _check_field(field.name, value[field.name])
        try:
            fields["state"] = ServerState(fields["state"])
        except ValueError:
            raise InvalidRecord(f"unknown state {fields['state']!r}") from None
        return cls(**fields)


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "state": str,
    "start": int,
    "end": int,
    "throughput": (int, float),
    "inference_rps": (int, float),
    "cache_tokens_left": int,
    "torch_dtype": str,
    "quant_type": str,
    "codecs": (list, tuple),
    "adapters": (list, tuple),
    "version": str,
    "public_name": str,
    "reachability": str,
    "next_pings": dict,
}
_MAX_STRING = 256
_MAX_LIST = 64


def _check_field(name: str, value: Any) -> Any:
    expected = _FIELD_TYPES[name]
    if isinstance(value, bool) or not isinstance(value, expected):
        raise InvalidRecord(f"field {name!r} has type {type(value).__name__}")
    if isinstance(value, str) and len(value) > _MAX_STRING:
        raise InvalidRecord(f"field {name!r} is too long")
    if isinstance(value, (list, tuple)):
        if len(value) > _MAX_LIST or not all(isinstance(item, str) and len(item) <= _MAX_STRING for item in value):
            raise InvalidRecord(f"field {name!r} must be a short list of short strings")
        return tuple(value)
    if name == "next_pings":
        if len(value) > _MAX_LIST or not all(
            isinstance(peer, str) and len(peer) <= _MAX_STRING and isinstance(rtt, (int, float)) and not isinstance(rtt, bool)
            and math.isfinite(rtt) and rtt >= 0
            for peer, rtt in value.items()
        ):
            raise InvalidRecord("field 'next_pings' must map peer ids to finite, non-negative seconds")
        return tuple(sorted((peer, float(rtt)) for peer, rtt in value.items()))
    if name in ("throughput", "inference_rps"):
        if not math.isfinite(value):
            raise InvalidRecord(f"field {name!r} is not finite")
        return float(value)
    return value


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """An entry of the model index: which models the swarm serves, and how many blocks each has."""

    num_blocks: int
    model_type: str

    def to_wire(self) -> dict[str, Any]:
        return {"v": RECORD_VERSION, "num_blocks": self.num_blocks, "model_type": self.model_type}

    @classmethod
    def from_wire(cls, value: Any) -> ModelRecord:
        if not isinstance(value, dict):
            raise InvalidRecord("model record is not a dict")
        num_blocks, model_type = value.get("num_blocks"), value.get("model_type")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise InvalidRecord(f"bad num_blocks {num_blocks!r}")
        if not isinstance(model_type, str) or len(model_type) > _MAX_STRING:
            raise InvalidRecord("bad model_type")
        return cls(num_blocks=num_blocks, model_type=model_type)


def parse_block_entries(
    block_index: int,
    entries: dict[str, Any],
    parsed: dict[tuple[str, bytes], ServerRecord] | None = None,
    rejected: dict[str, str] | None = None,
) -> dict[str, ServerRecord]:
    """Validate one block's {peer_id: raw value} entries; drop (and log) the invalid ones.

    `parsed` (shared across the blocks of one read) makes a server's identical records along its
    span one object, parsed once. `rejected`, if given, collects {peer_id: reason} of dropped ones.
    """
    records: dict[str, ServerRecord] = {}
    for peer_id, raw in entries.items():
        try:
            cache_key = (peer_id, msgpack.packb(raw)) if parsed is not None else None
            record = parsed.get(cache_key) if cache_key is not None else None
            if record is None:
                record = ServerRecord.from_wire(raw)
                if cache_key is not None:
                    parsed[cache_key] = record
            if not record.start <= block_index < record.end:
                raise InvalidRecord(f"span {record.start}:{record.end} does not contain block {block_index}")
        except InvalidRecord as e:
            logger.debug("ignoring record of %s for block %d: %s", peer_id, block_index, e)
            if rejected is not None:
                rejected[peer_id] = str(e)
            continue
        records[peer_id] = record
    return records
