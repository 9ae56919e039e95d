"""Choosing chains of servers that cover a range of blocks. Pure functions over validated records.

Client-mediated, hidden states go from the client to each hop's server and back, so the time of
one inference step through a route is the sum over hops of (client-to-server round trip + blocks x
that server's time per block); pushed server to server, it is half the client's round trip to the
first and from the last server, half the servers' announced round trips between hops, and compute.
`inference_route` finds the route minimising either exactly, by dynamic programming over block
boundaries: the graph is a DAG in block order, so no priority queue is needed.
`forward_route` spreads stateless traffic: at each hop it draws a server with probability
proportional to its throughput divided by the requests this client already has in flight there.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping

from swarm.errors import MissingBlocksError
from swarm.limits import DEFAULT_MAX_TOKENS_PER_REQUEST
from swarm.records import ServerRecord, ServerState, block_ranges

DEFAULT_RTT = 0.05  # seconds: assumed round trip to a server not pinged yet
DEFAULT_STEP_TIME = 0.01  # seconds per block: assumed for a server that announces no throughput
# Seconds added to a hop on a server that lacks the adapter a session names: it fetches the slice before the
# first step (tens of ms on loopback for a small LoRA, more across the internet), so a holder wins unless it is much slower.
ADAPTER_FETCH_PENALTY = 0.5


@dataclasses.dataclass(frozen=True)
class RouteHop:
    peer_id: str
    start: int  # first block this hop computes
    end: int  # one past the last


@dataclasses.dataclass(frozen=True)
class ServerFilter:
    """Which servers a client may use: `allowed` (None = any) minus `blocked` minus `banned`."""

    allowed: frozenset[str] | None = None
    blocked: frozenset[str] = frozenset()
    banned: frozenset[str] = frozenset()
    min_cache_tokens: int = 0  # servers with less room are skipped (inference sessions)
    codecs: frozenset[str] = frozenset()  # codecs the server must accept
    min_request_tokens: int = 0  # servers whose per-request limit is lower are skipped (stateless calls)

    def usable(self, peer: str, record: ServerRecord) -> bool:
        return (
            record.state == ServerState.ONLINE
            and self.codecs.issubset(record.codecs)
            and (self.allowed is None or peer in self.allowed)
            and peer not in self.blocked
            and peer not in self.banned
            and record.cache_tokens_left >= self.min_cache_tokens
            and request_limit(record) >= self.min_request_tokens
        )


def request_limit(record: ServerRecord) -> int:
    """Tokens (batch x sequence) the server takes in one forward or backward: what it announces, or the default."""
    return record.max_tokens_per_request or DEFAULT_MAX_TOKENS_PER_REQUEST


def batch_capacity(blocks: list[dict[str, ServerRecord]], servers: ServerFilter) -> tuple[int, int]:
    """(tokens per request, replicas) for splitting a stateless batch over [0, len(blocks)).

    Tokens: for each block the largest limit among its usable servers, and the smallest of those over
    blocks, so every part can be routed; a server that announces a small limit excludes only itself
    (routes for a part skip servers below its size), and cannot make every client split to nothing.
    Replicas: the fewest usable servers of any block, the parts that can travel in parallel.
    """
    limits, replicas = [], []
    for records in blocks:
        usable = [record for peer, record in records.items() if servers.usable(peer, record)]
        limits.append(max((request_limit(record) for record in usable), default=DEFAULT_MAX_TOKENS_PER_REQUEST))
        replicas.append(len(usable))
    return min(limits, default=DEFAULT_MAX_TOKENS_PER_REQUEST), max(1, min(replicas, default=1))


def missingblock_ranges(blocks: list[dict[str, ServerRecord]], servers: ServerFilter) -> list[tuple[int, int]]:
    """Half-open ranges of blocks that no usable server holds."""
    uncovered = [
        index for index, records in enumerate(blocks) if not any(servers.usable(peer, record) for peer, record in records.items())
    ]
    return block_ranges(uncovered)


def _check_coverage(blocks: list[dict[str, ServerRecord]], start: int, end: int, servers: ServerFilter, model: str) -> None:
    gaps = [(max(a, start), min(b, end)) for a, b in missingblock_ranges(blocks, servers) if a < end and b > start]
    if gaps:
        raise MissingBlocksError(gaps, model)


def step_time_per_block(record: ServerRecord) -> float:
    """Seconds one decode step spends in one block of this server."""
    return 1.0 / record.inference_rps if record.inference_rps > 0 else DEFAULT_STEP_TIME


def inference_route(
    blocks: list[dict[str, ServerRecord]],
    start: int,
    end: int,
    model: str,
    servers: ServerFilter = ServerFilter(),
    rtt: Mapping[str, float] = {},
    push: bool = False,
    adapter: str = "",
) -> list[RouteHop]:
    """The route over [start, end) with the least expected time per decode step; with `adapter` (a hash
    of an adapter held by servers), a server that would have to fetch it first costs ADAPTER_FETCH_PENALTY more.

    Client-mediated (`push=False`): every hop costs the client's round trip to its server plus its
    compute. With `push`, hidden states go client -> first server -> ... -> last server -> client: one
    way to the first, the servers' announced round trips (`next_pings`) halved between hops, one way
    back from the last, plus compute.
    """
    # For each block, the usable servers there as (peer, hop end, round trip, seconds per block, adapter fetch cost).
    # Each record object is checked once (swarm.dht shares one object along a server's span; all
    # stay alive during this call, so their ids are stable); the loops stay lean for 1000 servers.
    options: list[list[tuple[str, int, float, float, float]]] = []
    checked: dict[int, tuple[str, int, float, float, float] | None] = {}
    pings: dict[str, Mapping[str, float]] = {}  # peer -> its round trips to the servers after it
    uncovered = []
    for index in range(start, end):
        here = []
        for peer, record in blocks[index].items():
            key = id(record)
            if key not in checked:
                usable = servers.usable(peer, record)
                fetch = ADAPTER_FETCH_PENALTY if adapter and adapter not in record.adapters else 0.0
                checked[key] = (peer, min(record.end, end), rtt.get(peer, DEFAULT_RTT), step_time_per_block(record), fetch) if usable else None
                if usable and push:
                    pings[peer] = dict(record.next_pings)
            if checked[key] is not None:
                here.append(checked[key])
        if not here:
            uncovered.append(index)
        options.append(here)
    if uncovered:
        raise MissingBlocksError(block_ranges(uncovered), model)
    if push:
        return _push_route(options, start, end, rtt, pings)
    # best[b]: least time to have run blocks [start, b); via[b]: the hop that ends there.
    best = {start: 0.0}
    via: dict[int, tuple[int, str]] = {}
    for boundary in range(start, end):
        base = best.get(boundary)
        if base is None:
            continue
        for peer, hop_end, round_trip, per_block, fetch in options[boundary - start]:
            cost = base + round_trip + (hop_end - boundary) * per_block + fetch
            if cost < best.get(hop_end, math.inf):
                best[hop_end] = cost
                via[hop_end] = (boundary, peer)
    route: list[RouteHop] = []
    boundary = end
    while boundary != start:
        previous, peer = via[boundary]
        route.append(RouteHop(peer, previous, boundary))
        boundary = previous
    return route[::-1]


def _push_route(
    options: list[list[tuple[str, int, float, float, float]]], start: int, end: int, rtt: Mapping[str, float],
    pings: Mapping[str, Mapping[str, float]],
) -> list[RouteHop]:
    """Least client->first + server->server legs + last->client + compute, by dynamic programming over
    (boundary, server that ended there): a leg's cost depends on the server before it. A pair of
    servers without an announced round trip is assumed DEFAULT_RTT apart."""
    best: dict[tuple[int, str | None], float] = {(start, None): 0.0}
    via: dict[tuple[int, str], tuple[int, str | None]] = {}
    ending: dict[int, list[str | None]] = {start: [None]}  # servers whose hop ends at each boundary
    for boundary in range(start, end):
        for previous in ending.get(boundary, ()):
            base = best[(boundary, previous)]
            for peer, hop_end, round_trip, per_block, fetch in options[boundary - start]:
                leg = round_trip if previous is None else pings[previous].get(peer, DEFAULT_RTT)
                cost = base + leg / 2 + (hop_end - boundary) * per_block + fetch
                reached = (hop_end, peer)
                if reached not in best:
                    ending.setdefault(hop_end, []).append(peer)
                if cost < best.get(reached, math.inf):
                    best[reached] = cost
                    via[reached] = (boundary, previous)
    last: str | None = min((peer for peer in ending[end] if peer is not None), key=lambda p: best[(end, p)] + rtt.get(p, DEFAULT_RTT) / 2)
    route: list[RouteHop] = []
    boundary, hop_peer = end, last
    while hop_peer is not None:
        previous_boundary, previous = via[(boundary, hop_peer)]
        route.append(RouteHop(hop_peer, previous_boundary, boundary))
        boundary, hop_peer = previous_boundary, previous
    return route[::-1]


def forward_route(
    blocks: list[dict[str, ServerRecord]],
    start: int,
    end: int,
    model: str,
    servers: ServerFilter = ServerFilter(),
    in_flight: Mapping[str, int] = {},
    rng: random.Random | None = None,
    adapter: str = "",
) -> list[RouteHop]:
    """A route over [start, end) drawn by throughput and this client's current load on each server; with
    `adapter` (a hash of an adapter held by servers), among the servers that hold it wherever some do."""
    _check_coverage(blocks, start, end, servers, model)
    rng = rng or random.Random()
    route: list[RouteHop] = []
    position = start
    while position < end:
        candidates = [(peer, record) for peer, record in blocks[position].items() if servers.usable(peer, record)]
        holders = [(peer, record) for peer, record in candidates if adapter and adapter in record.adapters]
        candidates = holders or candidates
        weights = [
            max(record.throughput, 1e-3) * (record.end - position) / (1 + in_flight.get(peer, 0))
            for peer, record in candidates
        ]
        peer, record = rng.choices(candidates, weights=weights)[0]
        hop_end = min(record.end, end)
        route.append(RouteHop(peer, position, hop_end))
        position = hop_end
    return route
