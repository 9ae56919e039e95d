"""Who can send what of a model: the online servers of its id, and the parts each says it shares.

Read from the signed records (swarm.records), so a peer can only speak for itself. What a record
claims is not trusted beyond choosing whom to ask: every byte is verified on arrival.
"""

from __future__ import annotations

import dataclasses

from swarm.dht import DHT, fetch_model_index, fetch_records_at
from swarm.errors import ConfigError
from swarm.records import MAX_NUM_BLOCKS, ServerState, parts_shared


@dataclasses.dataclass(frozen=True)
class Providers:
    """Online servers of one model: each can send the manifest and config, and the parts it shares."""

    parts: dict[str, frozenset[str]]  # peer id -> manifest parts ("client", "block:N") it shares

    def of(self, part: str) -> list[str]:
        return sorted(peer for peer, parts in self.parts.items() if part in parts)


def find_providers(dht: DHT, model_id: str, num_blocks: int | None = None) -> Providers:
    """The model's online servers from one DHT read (blocking); ConfigError if the swarm has none.

    `num_blocks`: the model's blocks, once known from its manifest; before that, the model index's
    largest claim for this id (bounded by MAX_NUM_BLOCKS) says how many block keys to read.
    """
    if num_blocks is None:
        claims = fetch_model_index(dht).get(model_id, {})
        if not claims:
            known = sorted(fetch_model_index(dht))
            raise ConfigError(f"unknown model id {model_id}: no server in the swarm announces it"
                              + (f" (models announced: {', '.join(known[:10])})" if known else " (no model is announced)"))
        num_blocks = min(max(claim.num_blocks for claim in claims.values()), MAX_NUM_BLOCKS)
    parts: dict[str, frozenset[str]] = {}
    for records in fetch_records_at(dht, model_id, range(num_blocks)).values():
        for peer, record in records.items():
            if record.state == ServerState.ONLINE and peer not in parts:
                parts[peer] = parts_shared(record.shares)  # already validated when the record was read
    if not parts:
        raise ConfigError(f"model id {model_id} is announced, but none of its servers is online to share its files")
    return Providers(parts)
