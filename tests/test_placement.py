"""Block placement as plain data: the Nth server fills the least-served window; balanced swarms stay put."""

from __future__ import annotations

import random

import pytest

from swarm.errors import ConfigError
from swarm.records import ServerRecord, ServerState
from swarm.server.placement import block_throughputs, choose_start, should_move


def test_new_server_fills_uncovered_blocks_first():
    assert choose_start([10, 10, 10, 0, 0, 0], 3, own_throughput=5) == 3
    assert choose_start([0, 0, 10, 10, 10, 10], 2, own_throughput=5) == 0


def test_new_server_takes_the_weakest_window():
    # Blocks 4 and 5 are the bottleneck; any window containing both lifts it, the weakest one wins.
    assert choose_start([9, 9, 9, 9, 2, 2], 2, own_throughput=5) == 4
    assert choose_start([5, 1, 1, 5, 5, 5], 3, own_throughput=5) in (0, 1)


def test_servers_started_together_spread_over_equal_windows():
    # An empty swarm: windows that do not fragment the rest are equally good, and peers spread over them.
    starts = {choose_start([0] * 30, 10, own_throughput=1, tie_breaker=f"peer{i}") for i in range(20)}
    assert starts == {0, 10, 20}


def test_new_server_does_not_fragment_uncovered_blocks():
    # Taking 4:7 would leave 3:4 and 7:9 to cover separately; 6:9 leaves one window's worth.
    assert choose_start([5, 5, 5, 0, 0, 0, 0, 0, 0], 3, own_throughput=5) in (3, 6)


def test_too_many_blocks_is_a_config_error():
    with pytest.raises(ConfigError, match="--num-blocks 7"):
        choose_start([0] * 6, 7, own_throughput=1)


def test_balanced_swarm_does_not_move():
    # Two servers of 3 blocks each covering 6 blocks: moving cannot help.
    assert should_move([0, 0, 0, 5, 5, 5], current_start=0, num_blocks=3, own_throughput=5, balance_quality=0.75) is None
    # Small gains stay below the threshold: no move.
    assert should_move([10, 10, 9, 9, 9, 9], 0, 2, own_throughput=1, balance_quality=0.75) is None


def test_unbalanced_swarm_moves_to_cover_a_gap():
    # This server duplicates blocks 0:3 while 3:6 are served by nobody.
    assert should_move([5, 5, 5, 0, 0, 0], current_start=0, num_blocks=3, own_throughput=5, balance_quality=0.75) == 3


def simulate_joins(num_blocks: int, throughputs: list[float], span: int, rng: random.Random) -> tuple[list[int], int]:
    """Servers join one by one, each choosing its window; then every server re-checks until none moves."""
    starts: list[int] = []
    for index, own in enumerate(throughputs):
        totals = [0.0] * num_blocks
        for start, throughput in zip(starts, throughputs):
            for block in range(start, start + span):
                totals[block] += throughput
        starts.append(choose_start(totals, span, own, tie_breaker=str(index)))
    moves = 0
    for _ in range(10 * len(throughputs)):
        moved = False
        for index in rng.sample(range(len(starts)), len(starts)):
            totals = [0.0] * num_blocks
            for other, (start, throughput) in enumerate(zip(starts, throughputs)):
                if other != index:
                    for block in range(start, start + span):
                        totals[block] += throughput
            target = should_move(totals, starts[index], span, throughputs[index], 0.75, str(index))
            if target is not None:
                starts[index], moves, moved = target, moves + 1, True
        if not moved:
            break
    return starts, moves


def test_swarm_of_joining_servers_converges_with_few_moves():
    rng = random.Random(0)
    throughputs = [rng.uniform(1, 10) for _ in range(12)]
    starts, moves = simulate_joins(30, throughputs, 10, rng)
    totals = [0.0] * 30
    for start, throughput in zip(starts, throughputs):
        for block in range(start, start + 10):
            totals[block] += throughput
    assert min(totals) > 0
    assert moves < len(throughputs)


def test_block_throughputs_ignore_offline_servers_and_self():
    online = ServerRecord(state=ServerState.ONLINE, start=0, end=2, throughput=4.0)
    offline = ServerRecord(state=ServerState.OFFLINE, start=0, end=2, throughput=100.0)
    blocks = [{"a": online, "b": offline, "me": online}, {"a": online}]
    assert block_throughputs(blocks, exclude="me") == [4.0, 4.0]
