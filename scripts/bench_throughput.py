#!/usr/bin/env python
"""Throughput of concurrent inference sessions on a local swarm: what merging decode steps buys.

For 1, 4, 8 and 16 sessions at once (threads sharing one client, each session its own prompt and
`generate()` of N greedy tokens), measures the aggregate tokens/s and each session's per-token
latency, on a 2-server swarm of the default model with merged decode steps (the default) and,
for comparison in the same run, on one with merging off (`--max-merged-steps 1`). Also reports the
servers' merged forwards (mean steps per forward), whether every session got the tokens it gets
alone (local transformers' greedy tokens), and where the CPU time went (this process, i.e. the clients' embeddings, LM heads and
generate loops, against the servers), since clients and servers share this machine's cores.
Also measures one server's compute alone, in this process: a decode step of n sessions merged into one
forward against one session's, which is what merging saves a server whatever the clients do.

With `--adapters N`: 8 (`--adapter-sessions`) concurrent sessions using N different held adapters
(deterministic random LoRA of `--adapter-rank` on `--adapter-targets`, published by name) against
8 sessions with none, on the same swarm and interleaved; their steps merge into one base forward
plus a per-row LoRA correction (server/mixed_lora.py). For comparison, the old behaviour: each
adapter step alone (`--max-merged-steps 1`, which is the same when every session has an adapter;
skipped with `--no-unmerged`). Every session's tokens are checked against local peft with its
adapter. Also one server's compute for a decode step of those sessions: no adapters, one adapter
each (one rank; then ranks 4..64), and the adapter steps one by one. Prints tables and writes JSON.

    python scripts/bench_throughput.py                      # 1 4 8 16 sessions, 64 tokens, merged and unmerged
    python scripts/bench_throughput.py --sessions 1 8 --no-unmerged --output bench.json
    python scripts/bench_throughput.py --sessions 1 --adapters 8 --repeats 3   # the adapter rows (and one session)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Before torch loads OpenMP: this process shares the cores with the servers (see
# swarm.client.local_processes.SHARED_CORES_ENV).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psutil  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.adapter_files import read_peft_folder  # noqa: E402
from swarm.client.adapter_registry import AdapterRegistry, load_signer  # noqa: E402
from token_clock import TokenClock  # noqa: E402 (scripts/token_clock.py, beside this script)
from swarm.cli.logs import configure_logging  # noqa: E402
from swarm.client.event_loop import run_sync  # noqa: E402
from swarm.client.local_processes import LocalSwarm  # noqa: E402
from swarm.client.local_swarm import split_blocks  # noqa: E402
from swarm.families import family_of, load_config  # noqa: E402
from swarm.server.adapters import ParsedAdapter  # noqa: E402
from swarm.server.block_loader import load_span_layers  # noqa: E402
from swarm.server.inference_steps import InferenceStep, run_steps  # noqa: E402
from swarm.server.kv_cache import SessionCache  # noqa: E402
from swarm.server.span_runner import SpanRunner  # noqa: E402
from swarm.model_id import model_dht_prefix  # noqa: E402
from swarm.model_source import DEFAULT_MODEL, resolve_model  # noqa: E402
from swarm.transport import call_unary  # noqa: E402
from swarm.wire import swarm_rpc_pb2 as pb  # noqa: E402
from swarm.wire.rpc import RPC_INFO  # noqa: E402

logger = logging.getLogger("swarm.bench")

QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What is the capital of France?",
    "Name three rivers in Europe.",
    "Explain in simple words why the sky is blue, and why sunsets are red.",
    "Hi!",
    "List five fruits that are yellow.",
    "How do bees make honey? Answer in two sentences.",
    "Translate 'good morning' into French, Spanish and German.",
]



def served(model: torch.nn.Module) -> dict[str, pb.RequestCounts]:
    client = model.swarm_client
    peers = {peer for servers in run_sync(client.fetch_blocks()) for peer in servers}
    return {peer: run_sync(call_unary(client.p2p, peer, RPC_INFO, pb.InfoRequest(), pb.InfoResponse, 10.0)).served for peer in peers}


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def run_sessions(model: torch.nn.Module, prompts: list[torch.Tensor], new_tokens: int, server_pids: list[int],
                 adapters: list[str | None] | None = None) -> dict:
    """All prompts at once, one session each: aggregate tokens/s, per-session per-token latency, merges, CPU split.

    `adapters`: each session's held adapter (None: none), its session opened before the clock starts
    (the adapter is fixed when a session opens; the model's active adapter is shared by the threads)."""
    start = threading.Barrier(len(prompts) + 1)
    opening = threading.Lock()

    def one(prompt: torch.Tensor, adapter: str | None) -> tuple[torch.Tensor, TokenClock, float]:
        clock = TokenClock()
        session = contextlib.nullcontext()
        if adapters is not None:
            with opening:
                if adapter is None:
                    model.disable_adapters()
                else:
                    model.set_adapter(adapter)
                session = model.inference_session(max_length=prompt.shape[1] + new_tokens)
                session.__enter__()
        try:
            start.wait()
            began = time.perf_counter()
            with torch.inference_mode():
                output = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                        stopping_criteria=[clock])
        finally:
            session.__exit__(None, None, None)
        return output[0, prompt.shape[1]:], clock, began

    before = served(model)
    cpu_client, cpu_servers = time.process_time(), cpu_seconds(server_pids)
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(one, prompt, adapters[index] if adapters else None) for index, prompt in enumerate(prompts)]
        start.wait()
        began = time.perf_counter()
        results = [future.result() for future in futures]
    wall = time.perf_counter() - began
    cpu_client, cpu_servers = time.process_time() - cpu_client, cpu_seconds(server_pids) - cpu_servers
    after = served(model)
    merged_forwards = sum(after[p].merged_forwards - before[p].merged_forwards for p in after)
    merged_steps = sum(after[p].merged_steps - before[p].merged_steps for p in after)
    steps = sum(after[p].inference_steps - before[p].inference_steps for p in after)
    per_token = [statistics.mean(b - a for a, b in zip(clock.stamps, clock.stamps[1:])) * 1e3 for _, clock, _ in results]
    forwards = steps - merged_steps + merged_forwards
    return {
        "sessions": len(prompts),
        "wall_s": wall,
        "tokens_per_s": len(prompts) * new_tokens / wall,
        "per_token_ms_median": statistics.median(per_token),
        "per_token_ms_max": max(per_token),
        "ttft_ms_median": statistics.median((clock.stamps[0] - began) * 1e3 for _, clock, began in results),
        "server_steps": steps,
        "server_forwards": forwards,
        "steps_per_forward": steps / forwards if forwards else 0.0,
        "cpu_s_per_token_client": cpu_client / (len(prompts) * new_tokens),
        "cpu_s_per_token_servers": cpu_servers / (len(prompts) * new_tokens),
        "tokens": [tokens.tolist() for tokens, _, _ in results],
    }


def measure_swarm(checkpoint: Path, ranges: list[str], args: argparse.Namespace, prompts: list[torch.Tensor], *flags: str) -> list[dict]:
    swarm = LocalSwarm()
    remote = None
    try:
        swarm.start_dht()
        servers = swarm.start_servers(checkpoint, ranges, "--num-threads", str(args.threads), *flags)
        pids = [server.pid for server in servers]
        remote = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers, wire_codec=args.codec)
        run_sessions(remote, prompts[:1], 4, pids)  # warm-up: connections, first-call costs
        rows = []
        for count in args.sessions:
            chosen = [prompts[index % len(prompts)] for index in range(count)]
            runs = [run_sessions(remote, chosen, args.new_tokens, pids) for _ in range(args.repeats)]
            best = sorted(runs, key=lambda run: run["tokens_per_s"])[len(runs) // 2]  # the median run
            rows.append(best)
            logger.info("%s: %d sessions, %.1f tokens/s", " ".join(flags) or "merged", count, best["tokens_per_s"])
        return rows
    finally:
        if remote is not None:
            remote.swarm_client.shutdown()
        swarm.stop()


def server_compute(checkpoint: Path, block_range: str, prompt_lengths: list[int], counts: list[int], repeats: int = 8) -> list[dict]:
    """One server's compute alone, in this process: a decode step of n sessions merged into one forward
    (sessions at different positions, as in the swarm runs) against one session's step; medians of `repeats`."""
    config = load_config(checkpoint)
    start, end = (int(part) for part in block_range.split(":"))
    runner = SpanRunner(config, family_of(config), start, load_span_layers(checkpoint, config, family_of(config), start, end, torch.float32))
    hidden = config.hidden_size
    caches = []
    for index in range(max(counts)):
        length = prompt_lengths[index % len(prompt_lengths)]
        cache = SessionCache(config, start, end, 1, length + repeats * len(counts), torch.float32)  # a step per count per repeat
        with torch.inference_mode():
            runner(torch.randn(1, length, hidden), start, end, cache=cache)
        caches.append(cache)
    times: dict[int, list[float]] = {count: [] for count in counts}
    for _ in range(repeats):
        for count in counts:  # interleaved, so that a noisy moment hits every count alike
            steps = [InferenceStep(runner, start, end, torch.randn(1, 1, hidden), cache.length, cache, None, None)
                     for cache in caches[:count]]
            began = time.perf_counter()
            outputs, _ = run_steps(steps)
            times[count].append(time.perf_counter() - began)
            for output in outputs:
                if isinstance(output, Exception):
                    raise output
    one = statistics.median(times[counts[0]])
    return [
        {"sessions": count, "ms_per_forward": statistics.median(times[count]) * 1e3,
         "forward_vs_one": statistics.median(times[count]) / one,
         "tokens_per_s": count / statistics.median(times[count])}
        for count in counts
    ]


def make_adapters(checkpoint: Path, directory: Path, count: int, rank: int, targets: list[str]) -> dict[str, Path]:
    """`count` deterministic random LoRA folders (peft's format): A gaussian, B small, so answers change but stay sane."""
    folders = {}
    for index in range(count):
        torch.manual_seed(1000 + index)
        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        target_modules = targets[0] if targets == ["all-linear"] else targets
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=target_modules,
                                                init_lora_weights="gaussian"))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)
        folders[f"bench-{index}"] = directory / f"bench-{index}"
        model.save_pretrained(folders[f"bench-{index}"])
    return folders


def adapter_reference(checkpoint: Path, folders: dict[str, Path], prompts: list[torch.Tensor], names: list[str],
                      new_tokens: int) -> list[list[int]]:
    """Local peft's greedy tokens for session i: prompts[i] with adapter names[i]."""
    model = None
    for name, folder in folders.items():
        if model is None:
            base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, folder, adapter_name=name).eval()
        else:
            model.load_adapter(folder, adapter_name=name)
    assert model is not None
    tokens = []
    with torch.inference_mode():
        for prompt, name in zip(prompts, names):
            model.set_adapter(name)
            output = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            tokens.append(output[0, prompt.shape[1]:].tolist())
    return tokens


def measure_adapters(checkpoint: Path, ranges: list[str], args: argparse.Namespace, prompts: list[torch.Tensor],
                     folders: dict[str, Path], names: list[str], *flags: str, with_none: bool = True) -> dict[str, dict]:
    """On one swarm (servers started with `flags`): the sessions with adapters `names` and, if `with_none`,
    the same sessions with none, interleaved over `args.repeats` runs; the median run of each."""
    swarm = LocalSwarm()
    remote = None
    try:
        swarm.start_dht()
        servers = swarm.start_servers(checkpoint, ranges, "--num-threads", str(args.threads), *flags)
        pids = [server.pid for server in servers]
        remote = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers, wire_codec=args.codec)
        registry = AdapterRegistry(remote.swarm_client)
        with tempfile.TemporaryDirectory() as keys:
            signer = load_signer(Path(keys) / "publisher.key")
            for name, folder in folders.items():
                manifest, tensors = read_peft_folder(folder, model_dht_prefix(checkpoint), "model.layers.", 1 << 30)
                registry.publish(manifest, tensors, name, signer)
                deadline = time.monotonic() + 60
                while len(registry.holders(manifest.hash)) < len(ranges):  # servers announce within about a second
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"adapter {name} was not announced by the servers within 60 s")
                    time.sleep(0.2)
                remote.load_adapter(f"swarm:{name}", adapter_name=name)
        setups: dict[str, list[dict]] = {"adapters": []}
        if with_none:
            setups["none"] = []
        nothing: list[str | None] = [None] * len(names)
        run_sessions(remote, prompts[:1], 4, pids, list(names[:1]))  # warm-up: connections, first-call costs
        for _ in range(args.repeats):
            for setup in setups:  # interleaved, so that a noisy moment hits both alike
                chosen: list[str | None] = list(names) if setup == "adapters" else nothing
                setups[setup].append(run_sessions(remote, prompts, args.new_tokens, pids, chosen))
        return {setup: sorted(runs, key=lambda run: run["tokens_per_s"])[len(runs) // 2] for setup, runs in setups.items()}
    finally:
        if remote is not None:
            remote.swarm_client.shutdown()
        swarm.stop()


def adapter_compute(checkpoint: Path, block_range: str, prompt_lengths: list[int], sessions: int, rank: int,
                    targets: list[str], repeats: int = 8) -> list[dict]:
    """One server's compute alone, in this process: a decode step of `sessions` sessions merged into one
    forward with no adapters, with one adapter each (all of `rank`; then ranks 4..64, grouped by rank),
    and the same steps with adapters run one by one (the old behaviour); medians of `repeats`."""
    config = load_config(checkpoint)
    start, end = (int(part) for part in block_range.split(":"))
    runner = SpanRunner(config, family_of(config), start, load_span_layers(checkpoint, config, family_of(config), start, end, torch.float32))
    hidden = config.hidden_size
    paths = [name for name, module in runner.layers[0].named_modules()
             if isinstance(module, torch.nn.Linear) and (targets == ["all-linear"] or name.rsplit(".", 1)[-1] in targets)]
    generator = torch.Generator().manual_seed(0)

    def adapter(adapter_rank: int) -> ParsedAdapter:
        lora = {}
        for block in range(start, end):
            for path in paths:
                linear = runner.layers[block - start].get_submodule(path)
                lora[(block, path)] = (torch.randn(adapter_rank, linear.in_features, generator=generator) / adapter_rank,
                                       torch.randn(linear.out_features, adapter_rank, generator=generator) * 0.02)
        return ParsedAdapter(2.0, 0.0, lora, {}, None, frozen=True)

    same = [adapter(rank) for _ in range(sessions)]
    mixed = [adapter(4 << (index % 5)) for index in range(sessions)]  # ranks 4, 8, 16, 32, 64, 4, ...
    caches = []
    for index in range(sessions):
        length = prompt_lengths[index % len(prompt_lengths)]
        cache = SessionCache(config, start, end, 1, length + repeats * 4 + 1, torch.float32)  # a step per setup per repeat
        with torch.inference_mode():
            runner(torch.randn(1, length, hidden), start, end, cache=cache)
        caches.append(cache)
    setups = {"no adapters, merged": ([None] * sessions, True), f"{sessions} adapters of rank {rank}, merged": (same, True),
              f"{sessions} adapters of ranks 4..64, merged": (mixed, True), f"{sessions} adapters, one by one (old)": (same, False)}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, (adapters, merged) in setups.items():  # interleaved, so that a noisy moment hits every setup alike
            steps = [InferenceStep(runner, start, end, torch.randn(1, 1, hidden), cache.length, cache, None, held)
                     for cache, held in zip(caches, adapters)]
            began = time.perf_counter()
            outputs = run_steps(steps)[0] if merged else [result for step in steps for result in run_steps([step])[0]]
            times[name].append(time.perf_counter() - began)
            for output in outputs:
                if isinstance(output, Exception):
                    raise output
    none = statistics.median(times["no adapters, merged"])
    return [{"setup": name, "ms_per_step": statistics.median(runs) * 1e3, "vs_no_adapters": statistics.median(runs) / none}
            for name, runs in times.items()]


def relative(rows: list[dict], reference: dict[int, list[int]]) -> None:
    """Ratios against the one-session row of the same setup, and token equality with local transformers."""
    alone = rows[0]
    for row in rows:
        row["tokens_per_s_vs_one"] = row["tokens_per_s"] / alone["tokens_per_s"]
        row["per_token_vs_one"] = row["per_token_ms_median"] / alone["per_token_ms_median"]
        row["same_tokens_as_local"] = all(
            tokens == reference[index % len(QUESTIONS)] for index, tokens in enumerate(row["tokens"])
        )


def measure_adapter_rows(checkpoint: Path, ranges: list[str], args: argparse.Namespace, prompts: list[torch.Tensor],
                         reference: dict[int, list[int]]) -> dict:
    """The adapter rows (see the module docstring), each checked against local peft's (or transformers') tokens."""
    count = args.adapter_sessions
    names = [f"bench-{index % args.adapters}" for index in range(count)]
    chosen = [prompts[index % len(prompts)] for index in range(count)]
    with tempfile.TemporaryDirectory() as directory:
        folders = make_adapters(checkpoint, Path(directory), args.adapters, args.adapter_rank, args.adapter_targets)
        expected = adapter_reference(checkpoint, folders, chosen, names, args.new_tokens)
        runs = measure_adapters(checkpoint, ranges, args, chosen, folders, names)
        if not args.no_unmerged:
            old = measure_adapters(checkpoint, ranges, args, chosen, folders, names, "--max-merged-steps", "1", with_none=False)
            runs["adapters, old (unmerged)"] = old["adapters"]
    plain = [reference[index % len(prompts)] for index in range(count)]
    none = runs["none"]
    rows = []
    for setup, run in runs.items():
        run = {"setup": setup, **run}
        run["same_tokens_as_local"] = run.pop("tokens") == (plain if setup == "none" else expected)
        run["tokens_per_s_vs_none"] = run["tokens_per_s"] / none["tokens_per_s"]
        run["per_token_vs_none"] = run["per_token_ms_median"] / none["per_token_ms_median"]
        rows.append(run)
    compute = adapter_compute(checkpoint, ranges[0], [prompt.shape[1] for prompt in prompts], count, args.adapter_rank,
                              args.adapter_targets)
    return {"adapters": args.adapters, "sessions": count, "rank": args.adapter_rank, "targets": args.adapter_targets,
            "rows": rows, "server_compute": {"blocks": ranges[0], "rows": compute}}


def print_adapter_rows(adapters: dict, blocks: str, threads: int) -> None:
    print(f"\n{adapters['sessions']} concurrent sessions: {adapters['adapters']} different held adapters "
          f"(rank {adapters['rank']} on {' '.join(adapters['targets'])}) vs none; exact = tokens equal local peft's")
    print(f"{'setup':<26}{'tokens/s':>10}{'x none':>8}{'per-token ms':>14}{'x none':>8}{'TTFT ms':>9}{'steps/fwd':>10}{'exact':>7}")
    for row in adapters["rows"]:
        print(f"{row['setup']:<26}{row['tokens_per_s']:>10.1f}{row['tokens_per_s_vs_none']:>8.2f}{row['per_token_ms_median']:>14.1f}"
              f"{row['per_token_vs_none']:>8.2f}{row['ttft_ms_median']:>9.0f}{row['steps_per_forward']:>10.2f}"
              f"{str(row['same_tokens_as_local']):>7}")
    print(f"\none server's compute alone (blocks {blocks}, this process, {threads} torch threads): "
          f"a decode step of {adapters['sessions']} sessions")
    print(f"{'setup':<36}{'ms/step':>9}{'x none':>8}")
    for row in adapters["server_compute"]["rows"]:
        print(f"{row['setup']:<36}{row['ms_per_step']:>9.1f}{row['vs_no_adapters']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or alias (default: %(default)s)")
    parser.add_argument("--servers", type=int, default=2, help="servers splitting the blocks (default: %(default)s)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrent sessions (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens each session generates (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; the median run is reported (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per server and here (default: %(default)s)")
    parser.add_argument("--codec", default="none", help="wire codec (default: %(default)s, so tokens can be compared exactly)")
    parser.add_argument("--no-unmerged", action="store_true", help="skip the comparison swarm with --max-merged-steps 1")
    parser.add_argument("--adapters", type=int, default=0, metavar="N",
                        help="also measure sessions using N different held adapters against sessions with none (default: off)")
    parser.add_argument("--adapter-sessions", type=int, default=8, help="concurrent sessions in the adapter rows (default: %(default)s)")
    parser.add_argument("--adapter-rank", type=int, default=8, help="rank of the benchmark adapters (default: %(default)s)")
    parser.add_argument("--adapter-targets", nargs="+", default=["q_proj", "v_proj"],
                        help="modules the benchmark adapters target, or all-linear (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/throughput.json"), help="JSON file (default: %(default)s)")
    args = parser.parse_args()
    if args.sessions[0] != 1:
        parser.error("--sessions must start with 1: every figure is relative to one session")
    configure_logging()
    torch.set_num_threads(args.threads)

    checkpoint = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        for question in QUESTIONS
    ]
    ranges = split_blocks(load_config(checkpoint).num_hidden_layers, args.servers)
    local = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = {
            index: local.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)[
                0, prompt.shape[1]:].tolist()
            for index, prompt in enumerate(prompts[: max(*args.sessions, args.adapter_sessions if args.adapters else 0)])
        }
    del local
    compute = server_compute(checkpoint, ranges[0], [prompt.shape[1] for prompt in prompts], args.sessions)
    setups = {"merged": measure_swarm(checkpoint, ranges, args, prompts)}
    if not args.no_unmerged:
        setups["unmerged"] = measure_swarm(checkpoint, ranges, args, prompts, "--max-merged-steps", "1")
    for rows in setups.values():
        relative(rows, reference)
    adapters = measure_adapter_rows(checkpoint, ranges, args, prompts, reference) if args.adapters else None

    result = {
        "model": checkpoint.name, "servers": ranges, "threads": args.threads, "codec": args.codec,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "note": "clients and servers share this machine's cores; the machine was shared with other jobs",
        "server_compute": {"blocks": ranges[0], "rows": compute},
        "setups": {name: [{k: v for k, v in row.items() if k != "tokens"} for row in rows] for name, rows in setups.items()},
    }
    if adapters is not None:
        result["adapters"] = adapters
    print(f"\nmodel {checkpoint.name}, fp32, servers {', '.join(ranges)}, {args.threads} torch threads each, wire {args.codec}, "
          f"{args.new_tokens} tokens per session, {os.cpu_count()} cores shared by clients and servers")
    header = (f"{'setup':<10}{'sessions':>9}{'tokens/s':>10}{'x one':>7}{'per-token ms':>14}{'x one':>7}{'TTFT ms':>9}"
              f"{'steps/fwd':>10}{'cpu ms/tok client':>18}{'servers':>9}{'exact':>7}")
    print(header)
    for name, rows in setups.items():
        for row in rows:
            print(f"{name:<10}{row['sessions']:>9}{row['tokens_per_s']:>10.1f}{row['tokens_per_s_vs_one']:>7.2f}"
                  f"{row['per_token_ms_median']:>14.1f}{row['per_token_vs_one']:>7.2f}{row['ttft_ms_median']:>9.0f}"
                  f"{row['steps_per_forward']:>10.2f}{row['cpu_s_per_token_client'] * 1e3:>18.1f}"
                  f"{row['cpu_s_per_token_servers'] * 1e3:>9.1f}{str(row['same_tokens_as_local']):>7}")
    print(f"\none server's compute alone (blocks {ranges[0]}, this process, {args.threads} torch threads): a decode step of n sessions merged into one forward")
    print(f"{'sessions':>9}{'ms/forward':>12}{'x one':>7}{'tokens/s':>10}")
    for row in compute:
        print(f"{row['sessions']:>9}{row['ms_per_forward']:>12.1f}{row['forward_vs_one']:>7.2f}{row['tokens_per_s']:>10.1f}")
    if adapters is not None:
        print_adapter_rows(adapters, ranges[0], args.threads)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
