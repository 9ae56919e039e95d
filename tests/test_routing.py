"""Routing as plain data: fastest inference chains, spread forward traffic, filters and gaps."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from swarm.errors import MissingBlocksError
from swarm.records import ServerRecord, ServerState
from swarm.client.routing import RouteHop, ServerFilter, batch_capacity, forward_route, inference_route
from swarm.limits import DEFAULT_MAX_TOKENS_PER_REQUEST


def records(*servers: tuple[str, int, int, float]) -> list[dict[str, ServerRecord]]:
    """Blocks 0..max(end) with each (peer, start, end, inference_rps) server announced on its span."""
    total = max(end for _, _, end, _ in servers)
    blocks: list[dict[str, ServerRecord]] = [{} for _ in range(total)]
    for peer, start, end, rps in servers:
        record = ServerRecord(state=ServerState.ONLINE, start=start, end=end, throughput=rps * 10, inference_rps=rps)
        for index in range(start, end):
            blocks[index][peer] = record
    return blocks


def test_inference_route_prefers_fewer_hops_when_compute_is_equal():
    blocks = records(("a", 0, 3, 100), ("b", 3, 6, 100), ("c", 0, 6, 100))
    route = inference_route(blocks, 0, 6, "m", rtt={"a": 0.01, "b": 0.01, "c": 0.01})
    assert [(hop.peer_id, hop.start, hop.end) for hop in route] == [("c", 0, 6)]


def test_inference_route_avoids_a_slow_server_and_high_latency():
    blocks = records(("a", 0, 3, 100), ("b", 3, 6, 100), ("slow", 0, 6, 1))
    assert [hop.peer_id for hop in inference_route(blocks, 0, 6, "m")] == ["a", "b"]
    far = {"a": 0.5, "b": 0.5, "slow": 0.01}
    blocks = records(("a", 0, 3, 100), ("b", 3, 6, 100), ("near", 0, 6, 50))
    assert [hop.peer_id for hop in inference_route(blocks, 0, 6, "m", rtt=far)] == ["near"]


def test_inference_route_enters_a_server_mid_span():
    blocks = records(("a", 0, 4, 100), ("b", 2, 6, 100))
    route = inference_route(blocks, 0, 6, "m")
    assert [(hop.peer_id, hop.start, hop.end) for hop in route] == [("a", 0, 4), ("b", 4, 6)]


def test_filters_and_cache_room():
    blocks = records(("a", 0, 6, 100), ("b", 0, 6, 10))
    assert inference_route(blocks, 0, 6, "m", ServerFilter(banned=frozenset({"a"})))[0].peer_id == "b"
    assert inference_route(blocks, 0, 6, "m", ServerFilter(blocked=frozenset({"a"})))[0].peer_id == "b"
    assert inference_route(blocks, 0, 6, "m", ServerFilter(allowed=frozenset({"b"})))[0].peer_id == "b"
    with pytest.raises(MissingBlocksError, match="0:6"):
        inference_route(blocks, 0, 6, "m", ServerFilter(min_cache_tokens=1))


def test_missing_blocks_are_named():
    blocks = records(("a", 0, 2, 100), ("b", 4, 6, 100))
    blocks[3] = {}
    blocks[2] = {}
    with pytest.raises(MissingBlocksError, match="2:4"):
        inference_route(blocks, 0, 6, "m")


def test_forward_route_spreads_by_throughput_and_load():
    blocks = records(("fast", 0, 6, 90), ("slow", 0, 6, 10))
    rng = random.Random(0)
    picks = Counter(forward_route(blocks, 0, 6, "m", rng=rng)[0].peer_id for _ in range(2000))
    assert 0.85 < picks["fast"] / 2000 < 0.95
    loaded = Counter(forward_route(blocks, 0, 6, "m", in_flight={"fast": 20}, rng=rng)[0].peer_id for _ in range(2000))
    assert loaded["slow"] > loaded["fast"]


def test_offline_servers_are_not_used():
    blocks = records(("a", 0, 6, 100))
    blocks[0]["a"] = ServerRecord(state=ServerState.OFFLINE, start=0, end=6)
    with pytest.raises(MissingBlocksError, match="0:1"):
        inference_route(blocks, 0, 6, "m")


def test_a_server_announcing_a_tiny_request_limit_excludes_only_itself():
    """A hostile (or small) server's max_tokens_per_request must not shrink every client's batches."""
    blocks = records(("honest", 0, 6, 100), ("tiny", 0, 6, 100))
    for index in range(6):
        blocks[index]["tiny"] = dataclasses.replace(blocks[index]["tiny"], max_tokens_per_request=1)
    limit, replicas = batch_capacity(blocks, ServerFilter())
    assert (limit, replicas) == (DEFAULT_MAX_TOKENS_PER_REQUEST, 2)
    for _ in range(50):  # a part of 64 tokens never goes to the server that takes one
        route = forward_route(blocks, 0, 6, "m", ServerFilter(min_request_tokens=64))
        assert [hop.peer_id for hop in route] == ["honest"]
    assert forward_route(blocks, 0, 6, "m", ServerFilter(min_request_tokens=1), rng=random.Random(0))


def test_batch_capacity_takes_the_weakest_block():
    blocks = records(("a", 0, 3, 100), ("b", 3, 6, 100), ("c", 3, 6, 100))
    for index in range(3, 6):
        blocks[index]["b"] = dataclasses.replace(blocks[index]["b"], max_tokens_per_request=512)
        blocks[index]["c"] = dataclasses.replace(blocks[index]["c"], max_tokens_per_request=256)
    assert batch_capacity(blocks, ServerFilter()) == (512, 1)


def with_pings(blocks: list[dict[str, ServerRecord]], pings: dict[str, dict[str, float]]) -> list[dict[str, ServerRecord]]:
    """The same servers, each announcing its round trips to the servers after it."""
    replaced: dict[str, ServerRecord] = {}
    for servers in blocks:
        for peer, record in servers.items():
            replaced.setdefault(peer, dataclasses.replace(record, next_pings=tuple(sorted(pings.get(peer, {}).items()))))
    return [{peer: replaced[peer] for peer in servers} for servers in blocks]


def test_push_route_counts_server_to_server_legs():
    """Pushed, a chain costs half the client's round trip to the first and from the last server plus half
    the servers' own round trips between them: the pair of servers close to each other wins even where
    the client is slightly closer to another, which a client-mediated route prefers."""
    blocks = with_pings(records(("a", 0, 3, 100), ("b", 3, 6, 100), ("c", 3, 6, 100)), {"a": {"b": 0.002, "c": 0.2}})
    rtt = {"a": 0.05, "b": 0.06, "c": 0.05}
    assert [hop.peer_id for hop in inference_route(blocks, 0, 6, "m", rtt=rtt)] == ["a", "c"]
    assert [hop.peer_id for hop in inference_route(blocks, 0, 6, "m", rtt=rtt, push=True)] == ["a", "b"]


def test_push_route_is_optimal_on_random_swarms():
    """The push route's cost equals the least over every chain, found by brute force."""
    rng = random.Random(3)
    for _ in range(30):
        servers = []
        for index in range(8):
            start = rng.randrange(0, 6)
            servers.append((f"s{index}", start, rng.randrange(start + 1, 7), rng.uniform(10, 100)))
        servers += [("head", 0, 2, 50), ("tail", 4, 6, 50)]  # every block covered
        peers = [peer for peer, *_ in servers]
        pings = {peer: {other: rng.uniform(0.001, 0.1) for other in peers if other != peer} for peer in peers}
        blocks = with_pings(records(*servers), pings)
        rtt = {peer: rng.uniform(0.001, 0.1) for peer in peers}

        def cost(route) -> float:  # noqa: ANN001
            legs = rtt[route[0].peer_id] / 2 + rtt[route[-1].peer_id] / 2
            legs += sum(pings[a.peer_id][b.peer_id] / 2 for a, b in zip(route, route[1:]))
            return legs + sum((hop.end - hop.start) / blocks[hop.start][hop.peer_id].inference_rps for hop in route)

        def chains(boundary: int):  # noqa: ANN202
            if boundary == 6:
                yield []
                return
            for peer, record in blocks[boundary].items():
                for rest in chains(record.end):
                    yield [RouteHop(peer, boundary, record.end), *rest]

        best = min(cost(chain) for chain in chains(0))
        assert cost(inference_route(blocks, 0, 6, "m", rtt=rtt, push=True)) == pytest.approx(best)
