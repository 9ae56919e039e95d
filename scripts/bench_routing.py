#!/usr/bin/env python
"""Routing and placement at scale, on synthetic swarms (no processes, no network).

1. Route computation time: the fastest inference route and a forward route over swarms of 10,
   100 and 1000 servers with random spans, speeds and latencies (median of many runs).
2. Placement: servers join one by one with random throughputs, each choosing its window with
   --num-blocks logic, then every server re-checks (in random order) until none moves. Reports
   the bottleneck throughput reached against the best that a centralised local search finds
   with full knowledge (random restarts), and how many moves happened.

Prints tables and writes JSON.

    python scripts/bench_routing.py --output bench-results/routing.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from swarm.records import ServerRecord, ServerState
from swarm.client.routing import ServerFilter, forward_route, inference_route
from swarm.server.placement import choose_start, should_move

NUM_BLOCKS = 80


def synthetic_swarm(num_servers: int, rng: random.Random) -> tuple[list[dict[str, ServerRecord]], dict[str, float]]:
    blocks: list[dict[str, ServerRecord]] = [{} for _ in range(NUM_BLOCKS)]
    rtt = {}
    for index in range(num_servers):
        peer = f"peer{index:04d}"
        tiling = index < NUM_BLOCKS // 16  # the first servers tile the model, so that every swarm covers it
        length = 16 if tiling else rng.randint(4, 24)
        start = index * 16 if tiling else rng.randint(0, NUM_BLOCKS - length)
        end = start + length
        rps = rng.uniform(5, 200)
        cache = 65536 if tiling else rng.choice([0, 4096, 65536])
        record = ServerRecord(state=ServerState.ONLINE, start=start, end=end, throughput=rps * 20, inference_rps=rps,
                              cache_tokens_left=cache)
        for block in range(start, end):
            blocks[block][peer] = record
        rtt[peer] = rng.uniform(0.001, 0.2)
    return blocks, rtt


def time_routes(num_servers: int, repeats: int, rng: random.Random) -> dict:
    blocks, rtt = synthetic_swarm(num_servers, rng)
    servers = ServerFilter(min_cache_tokens=2048)
    timings = {"inference_ms": [], "forward_ms": []}
    for _ in range(repeats):
        began = time.perf_counter()
        route = inference_route(blocks, 0, NUM_BLOCKS, "bench", servers, rtt)
        timings["inference_ms"].append((time.perf_counter() - began) * 1e3)
        began = time.perf_counter()
        forward_route(blocks, 0, NUM_BLOCKS, "bench", ServerFilter(), {}, rng)
        timings["forward_ms"].append((time.perf_counter() - began) * 1e3)
    return {"servers": num_servers, "hops": len(route)} | {key: statistics.median(values) for key, values in timings.items()}


def simulate_placement(num_servers: int, span: int, balance_quality: float, rng: random.Random) -> dict:
    throughputs = [rng.uniform(1, 10) for _ in range(num_servers)]
    starts: list[int] = []

    def totals(exclude: int | None = None) -> list[float]:
        result = [0.0] * NUM_BLOCKS
        for index, (start, throughput) in enumerate(zip(starts, throughputs)):
            if index != exclude:
                for block in range(start, start + span):
                    result[block] += throughput
        return result

    for index, throughput in enumerate(throughputs):
        starts.append(choose_start(totals(), span, throughput, tie_breaker=str(index)))
    after_joins = min(totals())
    moves, rounds = 0, 0
    while rounds < 20 * num_servers:
        rounds += 1
        moved = False
        for index in rng.sample(range(num_servers), num_servers):
            target = should_move(totals(exclude=index), starts[index], span, throughputs[index], balance_quality, str(index))
            if target is not None:
                starts[index], moves, moved = target, moves + 1, True
        if not moved:
            break
    best = best_found(throughputs, span, rng)
    return {
        "servers": num_servers, "span": span, "balance_quality": balance_quality,
        "bottleneck_after_joins": after_joins, "bottleneck_final": min(totals()), "best_found": best,
        "upper_bound": span * sum(throughputs) / NUM_BLOCKS, "fraction_of_best": min(totals()) / best, "moves": moves,
    }


def best_found(throughputs: list[float], span: int, rng: random.Random, restarts: int = 20, steps: int = 3000) -> float:
    """The best bottleneck a centralised local search finds (random restarts; any single move that
    raises the bottleneck, or keeps it and lowers the number of blocks at it, is taken)."""
    def score(starts: list[int]) -> tuple[float, int]:
        totals = [0.0] * NUM_BLOCKS
        for start, throughput in zip(starts, throughputs):
            for block in range(start, start + span):
                totals[block] += throughput
        bottleneck = min(totals)
        return bottleneck, -sum(1 for total in totals if total <= bottleneck + 1e-9)

    best = 0.0
    for _ in range(restarts):
        starts = [rng.randint(0, NUM_BLOCKS - span) for _ in throughputs]
        current = score(starts)
        for _ in range(steps):
            index, target = rng.randrange(len(starts)), rng.randint(0, NUM_BLOCKS - span)
            previous, starts[index] = starts[index], target
            candidate = score(starts)
            if candidate >= current:
                current = candidate
            else:
                starts[index] = previous
        best = max(best, current[0])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50, help="route computations per swarm size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("bench-results/routing.json"), help="JSON file (default: %(default)s)")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    routes = [time_routes(n, args.repeats, rng) for n in (10, 100, 1000)]
    print(f"Route computation, model of {NUM_BLOCKS} blocks, median of {args.repeats}")
    print(f"{'servers':>8}{'inference ms':>14}{'forward ms':>12}{'hops':>6}")
    for row in routes:
        print(f"{row['servers']:>8}{row['inference_ms']:>14.3f}{row['forward_ms']:>12.3f}{row['hops']:>6}")

    placements = [simulate_placement(n, span, quality, rng) for n, span in ((8, 20), (24, 20), (64, 16)) for quality in (0.75, 0.9)]
    print(f"\nPlacement of servers joining one by one (model of {NUM_BLOCKS} blocks, random throughputs 1..10)")
    print(f"{'servers':>8}{'span':>6}{'quality':>9}{'after joins':>13}{'final':>9}{'best found':>12}{'of best':>9}{'moves':>7}")
    for row in placements:
        print(f"{row['servers']:>8}{row['span']:>6}{row['balance_quality']:>9.2f}{row['bottleneck_after_joins']:>13.2f}"
              f"{row['bottleneck_final']:>9.2f}{row['best_found']:>12.2f}{row['fraction_of_best']:>9.1%}{row['moves']:>7}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"routes": routes, "placement": placements}, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
