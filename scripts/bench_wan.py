#!/usr/bin/env python
"""Decode latency on an emulated WAN: server-to-server push against client-mediated chains.

A DHT, each server and the client run in network namespaces of their own, joined by the WAN
emulator in ../shared/tools/wan (tbf bandwidth per host, a delay proxy in front of every listener,
so any two hosts are 2 x DELAY apart). For each network setting and number of servers splitting
the default model, the client (in its namespace) measures plain local transformers first (the
compute), then the swarm with push=True and push=False: time to first token and the median of
64 decode steps, and how many round trips the step costs beyond local compute. Prints a table and
writes JSON. Needs root (ip netns); it refuses to start if the emulator's namespaces exist already.

    python scripts/bench_wan.py                                  # 100 Mbit/s 25 ms and 20 Mbit/s 50 ms; 2 and 4 servers
    python scripts/bench_wan.py --settings 100:25 --servers 2 --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the client shares the cores with the servers

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from token_clock import TokenClock  # noqa: E402 (scripts/token_clock.py, beside this script)
from swarm.cli.logs import configure_logging  # noqa: E402
from swarm.client.local_processes import SHARED_CORES_ENV, ManagedProcess  # noqa: E402
from swarm.client.local_swarm import split_blocks  # noqa: E402
from swarm.families import load_config  # noqa: E402
from swarm.model_source import DEFAULT_MODEL, resolve_model  # noqa: E402
from swarm.wire.codecs import DEFAULT_CODEC  # noqa: E402

logger = logging.getLogger("swarm.bench")

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LISTEN_PORT = 31000  # inside each namespace, on 127.0.0.1; the delay proxy listens on HOST_IP:LISTEN_PORT + 1000
TARGETS = {2: 1.6, 4: 2.6}  # round trips over compute that push should stay within (issue 10)
WORKER_TIMEOUT = 900.0  # seconds for the client to measure one setting



def timed_generation(model, input_ids: torch.Tensor, new_tokens: int, session=None) -> dict:  # noqa: ANN001
    """Time to first token (ms, opening the session included), each decode step (ms) and the new tokens."""
    clock = TokenClock()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, stopping_criteria=[clock])
    began = time.perf_counter()
    with torch.inference_mode():
        if session is None:
            output = model.generate(input_ids, **kwargs)
        else:
            with session():
                output = model.generate(input_ids, **kwargs)
    gaps = [(b - a) * 1e3 for a, b in zip(clock.stamps, clock.stamps[1:])]
    return {"ttft_ms": (clock.stamps[0] - began) * 1e3, "gaps_ms": gaps, "tokens": output[0, input_ids.shape[1]:].tolist()}


def worker(args: argparse.Namespace) -> None:
    """The client's side, run inside its namespace: local compute and the swarm with and without push,
    in alternating rounds, so that load from elsewhere on the machine weighs on all three alike."""
    torch.set_num_threads(args.threads)
    checkpoint = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": PROMPT}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    steps = args.new_tokens + 1  # N+1 tokens give N decode steps after the first
    max_length = input_ids.shape[1] + steps
    local = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    remotes = {
        mode: AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=args.initial_peers, wire_codec=args.codec,
                                                              push=mode == "push")
        for mode in ("push", "client-mediated")
    }
    runs: dict[str, list[dict]] = {"local": [], **{mode: [] for mode in remotes}}
    try:
        timed_generation(local, input_ids, 4)  # warm-up: routes, connections, pings
        for remote in remotes.values():
            timed_generation(remote, input_ids, 4, lambda: remote.inference_session(max_length=max_length))
        for _ in range(args.rounds):
            runs["local"].append(timed_generation(local, input_ids, steps))
            for mode, remote in remotes.items():
                runs[mode].append(timed_generation(remote, input_ids, steps, lambda: remote.inference_session(max_length=max_length)))
        result = {mode: summarize(mode_runs) for mode, mode_runs in runs.items()}
        for mode, remote in remotes.items():
            result[mode]["client_rtt_ms"] = {peer[-8:]: seconds * 1e3 for peer, seconds in remote.swarm_client.rtt().items()}
    finally:
        for remote in remotes.values():
            remote.swarm_client.shutdown()
    print(json.dumps(result), flush=True)


def summarize(runs: list[dict]) -> dict:
    """Median step over every step of every round, median TTFT over rounds, and whether every round's tokens agree."""
    return {
        "step_ms": statistics.median(gap for run in runs for gap in run["gaps_ms"]),
        "ttft_ms": statistics.median(run["ttft_ms"] for run in runs),
        "steps": sum(len(run["gaps_ms"]) for run in runs),
        "round_step_ms": [statistics.median(run["gaps_ms"]) for run in runs],
        "tokens": runs[0]["tokens"] if all(run["tokens"] == runs[0]["tokens"] for run in runs) else None,
    }


class Wan:
    """The emulator's command line (../shared/tools/wan/wan.sh)."""

    def __init__(self, script: Path):
        self.script = script

    def __call__(self, *args: object) -> str:
        done = subprocess.run(["bash", str(self.script), *map(str, args)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"wan.sh {' '.join(map(str, args))} failed:\n{done.stdout}{done.stderr}")
        return done.stdout.strip()

    def exec_args(self, host: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", f"ns-{host}", *args]


def on_wan(wan: Wan, host: str) -> list[str]:
    """--host-maddrs/--announce-maddrs for a program in `host` that others reach through its delay proxy."""
    wan("proxy", host, LISTEN_PORT + 1000, LISTEN_PORT)
    return ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{LISTEN_PORT}", "--announce-maddrs", f"/ip4/{wan('ip', host)}/tcp/{LISTEN_PORT + 1000}"]


def measure_setting(wan: Wan, args: argparse.Namespace, checkpoint: Path, servers: int, rate: int, delay: float) -> dict:
    wan("up", servers, rate, delay)
    processes: list[ManagedProcess] = []
    try:
        python = sys.executable
        dht = ManagedProcess(wan.exec_args("dht", python, "-m", "swarm.cli.dht", *on_wan(wan, "dht")))
        processes.append(dht)
        peers = dht.wait_for_line("--initial-peers ").split("--initial-peers ", 1)[1].split()
        ranges = split_blocks(load_config(checkpoint).num_hidden_layers, servers)
        for index, blocks in enumerate(ranges, start=1):
            command = [python, "-m", "swarm.server.cli", str(checkpoint), "--blocks", blocks, "--initial-peers", *peers,
                       "--num-threads", str(args.threads), "--no-relay", *on_wan(wan, f"s{index}")]
            processes.append(ManagedProcess(wan.exec_args(f"s{index}", *command), env=SHARED_CORES_ENV))
        for server in processes[1:]:
            server.wait_for_line("serving blocks")
        client = ManagedProcess(wan.exec_args("c", python, str(Path(__file__).resolve()), "--worker", "--model", str(checkpoint),
                                              "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                                              "--rounds", str(args.rounds),
                                              "--codec", args.codec, "--initial-peers", *peers))
        processes.append(client)
        client.popen.wait(WORKER_TIMEOUT)
        lines = [line for line in client.lines if line.startswith("{")]
        if client.popen.returncode != 0 or not lines:
            raise RuntimeError("the client failed:\n" + client.output()[-4000:])
        return json.loads(lines[-1]) | {"servers": ranges}
    finally:
        for process in reversed(processes):
            process.stop()
        wan("down")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or alias (default: %(default)s)")
    parser.add_argument("--settings", nargs="*", default=["100:25", "20:50"],
                        help="RATE_MBIT:ONE_WAY_DELAY_MS per host (default: %(default)s)")
    parser.add_argument("--servers", type=int, nargs="*", default=[2, 4], help="servers splitting the model (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps to take the median of (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of local, push, client-mediated (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, locally and per server (default: %(default)s)")
    parser.add_argument("--codec", default="none", help=f"wire codec; uncompressed by default, so that the tokens must equal "
                        f"local ones (a decode step's hidden states are a few KB either way; users' default is {DEFAULT_CODEC})")
    parser.add_argument("--wan-tool", type=Path, default=REPO.parent / "shared/tools/wan/wan.sh", help="the emulator (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/wan.json"), help="JSON file (default: %(default)s)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging()
    if args.worker:
        worker(args)
        return
    if os.geteuid() != 0:
        sys.exit("bench_wan.py needs root: it creates network namespaces")
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if any(line.split()[0] in ("ns-wan", "ns-c", "ns-dht") for line in existing.splitlines() if line.strip()):
        sys.exit("the WAN emulator's namespaces exist already (someone else is using it?); wan.sh down first if not")
    wan = Wan(args.wan_tool)
    checkpoint = resolve_model(args.model)
    results = []
    for setting in args.settings:
        rate, delay = setting.split(":")
        for servers in args.servers:
            logger.info("measuring %d servers at %s Mbit/s, %s ms one way", servers, rate, delay)
            measured = measure_setting(wan, args, checkpoint, servers, int(rate), float(delay))
            rtt = 2 * float(delay)
            local = measured["local"]["step_ms"]
            row = {"rate_mbit": int(rate), "delay_ms": float(delay), "rtt_ms": rtt, "servers": servers, "ranges": measured["servers"],
                   "local_step_ms": local, "local_ttft_ms": measured["local"]["ttft_ms"],
                   "local_round_step_ms": measured["local"]["round_step_ms"], "target_rtts": TARGETS.get(servers)}
            for mode in ("push", "client-mediated"):
                run = measured[mode]
                row[mode] = {
                    "ttft_ms": run["ttft_ms"], "step_ms": run["step_ms"], "steps": run["steps"], "round_step_ms": run["round_step_ms"],
                    "overhead_rtts": (run["step_ms"] - local) / rtt, "client_rtt_ms": run["client_rtt_ms"],
                    "same_tokens_as_local": run["tokens"] is not None and run["tokens"] == measured["local"]["tokens"],
                }
            results.append(row)
    print(f"\nmodel {checkpoint.name}, fp32, wire {args.codec}, {args.threads} torch thread(s) per process, median of "
          f"{args.rounds} x {args.new_tokens} decode steps (local and both modes in alternating rounds); machine shared with other work")
    print(f"{'network':<22}{'servers':>8}{'mode':>17}{'local ms':>10}{'step ms':>10}{'(step-local)/RTT':>18}{'target':>8}"
          f"{'local TTFT':>12}{'TTFT ms':>10}{'same tokens':>13}")
    for row in results:
        network = f"{row['rate_mbit']} Mbit/s {row['rtt_ms']:.0f} ms RTT"
        for mode in ("push", "client-mediated"):
            run = row[mode]
            target = f"{row['target_rtts']:.1f}" if mode == "push" and row["target_rtts"] else ""
            print(f"{network:<22}{row['servers']:>8}{mode:>17}{row['local_step_ms']:>10.1f}{run['step_ms']:>10.1f}"
                  f"{run['overhead_rtts']:>18.2f}{target:>8}{row['local_ttft_ms']:>12.1f}{run['ttft_ms']:>10.1f}"
                  f"{str(run['same_tokens_as_local']):>13}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": checkpoint.name, "codec": args.codec, "threads": args.threads,
                                       "new_tokens": args.new_tokens, "rounds": args.rounds, "results": results}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
