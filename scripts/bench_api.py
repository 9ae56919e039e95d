#!/usr/bin/env python
"""The OpenAI-compatible API under load: streaming chat requests through swarm-api and a local swarm.

A DHT and two servers split the default model; swarm-api serves it; 1, 4 and 8 clients (threads
with the official `openai` package) each stream chat completions at the same time. Per concurrency
level: time to first token and inter-token latency percentiles, tokens/s per request and in all.
Prints a table and writes JSON.

    python scripts/bench_api.py                    # 1, 4, 8 concurrent requests, 32 tokens each
    python scripts/bench_api.py --levels 1 2 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see swarm.client.local_processes.SHARED_CORES_ENV

import openai  # noqa: E402

from swarm.client.local_processes import LocalSwarm  # noqa: E402
from swarm.model_source import DEFAULT_MODEL, resolve_model  # noqa: E402

TOPICS = ["rivers", "bridges", "owls", "volcanoes", "trains", "tea", "glaciers", "maps"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_request(client: openai.OpenAI, model: str, topic: str, tokens: int, start: threading.Barrier) -> dict:
    start.wait()
    began = time.perf_counter()
    stamps = []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Tell me about {topic}."}],
                                            max_tokens=tokens, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    ended = time.perf_counter()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft_s": stamps[0] - began if stamps else float("nan"), "gaps_s": gaps, "chunks": len(stamps),
            "seconds": ended - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8], help="concurrent requests per level")
    parser.add_argument("--tokens", type=int, default=32, help="max tokens per request")
    parser.add_argument("--output", type=Path, default=Path("bench-results/bench_api.json"))
    args = parser.parse_args()

    path = resolve_model(DEFAULT_MODEL)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    swarm = LocalSwarm()
    results = []
    try:
        swarm.start_dht()
        swarm.start_servers(path, ["0:15", "15:30"], "--num-threads", "1")
        url = swarm.start_api(path, DEFAULT_MODEL, port)
        client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
        one_request(client, DEFAULT_MODEL, "warm-up", 4, threading.Barrier(1))
        for level in args.levels:
            start = threading.Barrier(level)
            began = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                runs = list(pool.map(lambda i: one_request(client, DEFAULT_MODEL, TOPICS[i % len(TOPICS)], args.tokens, start),
                                     range(level)))
            wall = time.perf_counter() - began
            gaps = [gap for run in runs for gap in run["gaps_s"]]
            ttfts = [run["ttft_s"] for run in runs]
            chunks = sum(run["chunks"] for run in runs)
            results.append({
                "concurrency": level, "wall_s": wall, "chunks": chunks,
                "ttft_p50_ms": 1e3 * percentile(ttfts, 0.5), "ttft_p90_ms": 1e3 * percentile(ttfts, 0.9),
                "itl_p50_ms": 1e3 * percentile(gaps, 0.5), "itl_p90_ms": 1e3 * percentile(gaps, 0.9),
                "itl_p99_ms": 1e3 * percentile(gaps, 0.99),
                "tokens_per_s_per_request": statistics.mean(run["chunks"] / run["seconds"] for run in runs),
                "tokens_per_s_total": chunks / wall,
            })
    finally:
        swarm.stop()

    print(f"\nstreaming chat via swarm-api, default model, 2 servers (0:15, 15:30), default wire codec, {args.tokens} tokens max")
    print(f"{'concurrent':>10} {'TTFT p50 ms':>12} {'TTFT p90':>9} {'ITL p50 ms':>11} {'ITL p90':>8} {'ITL p99':>8} "
          f"{'tok/s/req':>10} {'tok/s total':>12}")
    for row in results:
        print(f"{row['concurrency']:>10} {row['ttft_p50_ms']:>12.0f} {row['ttft_p90_ms']:>9.0f} {row['itl_p50_ms']:>11.0f} "
              f"{row['itl_p90_ms']:>8.0f} {row['itl_p99_ms']:>8.0f} {row['tokens_per_s_per_request']:>10.2f} {row['tokens_per_s_total']:>12.2f}")
    print("(tokens counted as streamed chunks that carry text: one per token, except where a character spans tokens)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "levels": results}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
