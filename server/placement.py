"""Which blocks a server should hold: the swarm's weakest window, and when moving is worth it.

Pure functions over per-block throughput totals; nothing here talks to the network. A swarm's
quality is judged lexicographically: first the number of blocks nobody serves (fewer is better),
then the bottleneck, the lowest total throughput of any block (higher is better). A server moves
only if moving improves that quality clearly (`balance_quality`), so every move strictly raises
the swarm's quality and servers cannot oscillate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from swarm.errors import ConfigError
from swarm.records import ServerRecord, ServerState


def block_throughputs(
    blocks: Sequence[Mapping[str, ServerRecord]], exclude: str | None = None, default_throughput: float = 1.0
) -> list[float]:
    """Total throughput serving each block, from joining and online servers other than `exclude`."""
    totals = []
    for records in blocks:
        total = 0.0
        for peer, record in records.items():
            if peer != exclude and record.state in (ServerState.JOINING, ServerState.ONLINE):
                total += record.throughput if record.throughput > 0 else default_throughput
        totals.append(total)
    return totals


def swarm_quality(throughputs: Sequence[float]) -> tuple[int, float]:
    """(blocks served by nobody, bottleneck throughput): the first smaller or the second larger is better."""
    return sum(1 for total in throughputs if total <= 0), min(throughputs, default=0.0)


def _windows_to_cover(throughputs: Sequence[float], num_blocks: int) -> int:
    """How many more windows of `num_blocks` it takes to cover the blocks nobody serves."""
    needed, run = 0, 0
    for total in [*throughputs, 1.0]:
        if total <= 0:
            run += 1
        elif run:
            needed, run = needed + -(-run // num_blocks), 0
    return needed


def _blocks_at_bottleneck(throughputs: Sequence[float]) -> int:
    bottleneck = min(throughputs, default=0.0)
    return sum(1 for total in throughputs if total <= bottleneck * (1 + 1e-9))


def choose_start(throughputs: Sequence[float], num_blocks: int, own_throughput: float, tie_breaker: str = "") -> int:
    """The start of the window of `num_blocks` whose serving makes the swarm best.

    Among equally good windows, `tie_breaker` (the server's peer id) picks one pseudo-randomly, so
    that servers started together spread out instead of all taking the first window.
    """
    total_blocks = len(throughputs)
    if not 0 < num_blocks <= total_blocks:
        raise ConfigError(f"--num-blocks {num_blocks} must be between 1 and the model's {total_blocks} blocks")
    candidates = []
    for start in range(total_blocks - num_blocks + 1):
        after = list(throughputs)
        for index in range(start, start + num_blocks):
            after[index] += own_throughput
        uncovered, bottleneck = swarm_quality(after)
        window = throughputs[start : start + num_blocks]
        # Better swarm first (fewer blocks left at the bottleneck, so later servers can raise it);
        # then the window whose own blocks are weakest.
        # Fragmenting the uncovered blocks costs the swarm later servers, so that counts first.
        key = (_windows_to_cover(after, num_blocks), uncovered, -bottleneck, _blocks_at_bottleneck(after), sum(window))
        candidates.append((key, start))
    best_key = min(key for key, _ in candidates)
    tied = [start for key, start in candidates if key == best_key]
    digest = int.from_bytes(hashlib.sha256(tie_breaker.encode()).digest()[:8], "big")
    return tied[digest % len(tied)]


def should_move(
    throughputs_without_me: Sequence[float], current_start: int, num_blocks: int, own_throughput: float,
    balance_quality: float, tie_breaker: str = "",
) -> int | None:
    """The start to move to, or None if moving would not improve the swarm clearly.

    A move is worth it if it serves blocks that nobody else would, or if it raises the bottleneck
    so that the current one is below `balance_quality` times the new one (0.75: at least +33%).
    """
    def quality_at(start: int) -> tuple[int, float]:
        after = list(throughputs_without_me)
        for index in range(start, start + num_blocks):
            after[index] += own_throughput
        return swarm_quality(after)

    best = choose_start(throughputs_without_me, num_blocks, own_throughput, tie_breaker)
    if best == current_start:
        return None
    (uncovered_now, bottleneck_now), (uncovered_best, bottleneck_best) = quality_at(current_start), quality_at(best)
    if uncovered_best < uncovered_now:
        return best
    if uncovered_best == uncovered_now == 0 and bottleneck_now < balance_quality * bottleneck_best:
        return best
    return None
