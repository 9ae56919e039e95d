"""Choosing a chain of servers that covers a range of blocks.

This is the simple router of the foundation: at each block, take the online server whose span
reaches furthest. It knows nothing about the network; it works on validated records.
"""

from __future__ import annotations

import dataclasses

from swarm.errors import MissingBlocksError
from swarm.records import ServerRecord, ServerState


@dataclasses.dataclass(frozen=True)
class RouteHop:
    peer_id: str
    start: int  # first block this hop computes
    end: int  # one past the last


def missing_ranges(blocks: list[dict[str, ServerRecord]], banned: frozenset[str] = frozenset()) -> list[tuple[int, int]]:
    """Half-open ranges of blocks that no usable online server holds."""
    missing: list[tuple[int, int]] = []
    for index, servers in enumerate(blocks):
        if any(_usable(peer, record, banned) for peer, record in servers.items()):
            continue
        if missing and missing[-1][1] == index:
            missing[-1] = (missing[-1][0], index + 1)
        else:
            missing.append((index, index + 1))
    return missing


def make_route(
    blocks: list[dict[str, ServerRecord]], start: int, end: int, model: str, banned: frozenset[str] = frozenset()
) -> list[RouteHop]:
    """A chain of hops covering blocks [start, end); MissingBlocksError names the gaps."""
    gaps = [(a, b) for a, b in missing_ranges(blocks, banned) if a < end and b > start]
    if gaps:
        raise MissingBlocksError([(max(a, start), min(b, end)) for a, b in gaps], model)
    route: list[RouteHop] = []
    position = start
    while position < end:
        peer, record = max(
            ((peer, record) for peer, record in blocks[position].items() if _usable(peer, record, banned)),
            key=lambda item: (item[1].end, item[1].throughput),
        )
        hop_end = min(record.end, end)
        route.append(RouteHop(peer, position, hop_end))
        position = hop_end
    return route


def _usable(peer: str, record: ServerRecord, banned: frozenset[str]) -> bool:
    return record.state == ServerState.ONLINE and peer not in banned
