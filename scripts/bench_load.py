#!/usr/bin/env python
"""Many clients at once on one small swarm: exactness, fairness, server memory, cost of spot checks.

A DHT and servers split the default model in two halves, each half on `--replicas` servers. Each phase runs N inference clients (each its own
model object, so its own peer, generating greedy tokens from its own prompt) and M training
clients (LoRA steps through the swarm) concurrently; the inference clients' tokens are compared
with local transformers. Phases: spot checks off, then `verify_fraction` on. Peak RSS of each
server process is sampled throughout. Prints a table and writes JSON.

    python scripts/bench_load.py                            # 16 inference + 4 training clients
    python scripts/bench_load.py --inference 8 --training 2 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see swarm.client.local_processes.SHARED_CORES_ENV

import psutil  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.cli.logs import configure_logging  # noqa: E402
from swarm.client.local_processes import LocalSwarm  # noqa: E402
from swarm.model_source import DEFAULT_MODEL, resolve_model  # noqa: E402

logger = logging.getLogger("swarm.bench")

TOPICS = ["rivers", "bridges", "owls", "volcanoes", "trains", "tea", "glaciers", "maps", "bees", "clocks",
          "ships", "forests", "comets", "bread", "violins", "deserts", "lanterns", "kites", "caves", "salt"]


class PeakRss:
    """Samples the resident memory of some processes every 0.2 s; keeps each one's peak (MiB)."""

    def __init__(self, pids: list[int]):
        self.processes = [psutil.Process(pid) for pid in pids]
        self.peaks = [0.0 for _ in pids]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for index, process in enumerate(self.processes):
                try:
                    self.peaks[index] = max(self.peaks[index], process.memory_info().rss / 2**20)
                except psutil.Error:
                    pass

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def inference_client(path: Path, peers: list[str], input_ids: torch.Tensor, tokens: int, verify: float) -> dict:
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, wire_codec="none", verify_fraction=verify)
    try:
        began = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(input_ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        seconds = time.perf_counter() - began
        checker = model.swarm_client.spot_checker
        return {"seconds": seconds, "tokens_per_s": tokens / seconds, "tokens": output[0, input_ids.shape[1]:].tolist(),
                "checks": checker.checks if checker else 0}
    finally:
        model.swarm_client.shutdown()


def training_client(path: Path, peers: list[str], steps: int, seed: int, verify: float) -> dict:
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, verify_fraction=verify)
    try:
        model.add_adapter(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), adapter_name="bench")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ids = torch.randint(100, 40000, (2, 64), generator=torch.Generator().manual_seed(seed))
        began = time.perf_counter()
        for _ in range(steps):
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = time.perf_counter() - began
        checker = model.swarm_client.spot_checker
        return {"seconds": seconds, "steps_per_s": steps / seconds, "final_loss": float(loss.detach()),
                "checks": checker.checks if checker else 0}
    finally:
        model.swarm_client.shutdown()


def run_phase(path: Path, swarm: LocalSwarm, prompts: list[torch.Tensor], expected: list[list[int]], args, verify: float) -> dict:  # noqa: ANN001
    server_pids = [process.pid for process in swarm.processes[1:]]
    with PeakRss(server_pids) as rss, ThreadPoolExecutor(len(prompts) + args.training) as pool:
        began = time.perf_counter()
        infer = [pool.submit(inference_client, path, swarm.initial_peers, ids, args.tokens, verify) for ids in prompts]
        train = [pool.submit(training_client, path, swarm.initial_peers, args.steps, seed, verify) for seed in range(args.training)]
        inference = [future.result() for future in infer]
        training = [future.result() for future in train]
        wall = time.perf_counter() - began
    speeds = [result["tokens_per_s"] for result in inference]
    return {
        "verify_fraction": verify,
        "wall_s": wall,
        "exact": sum(result["tokens"] == want for result, want in zip(inference, expected)),
        "clients": len(inference),
        "tokens_per_s_min": min(speeds),
        "tokens_per_s_median": statistics.median(speeds),
        "tokens_per_s_max": max(speeds),
        "fairness_slowest_over_fastest": min(speeds) / max(speeds),
        "training_steps_per_s": [result["steps_per_s"] for result in training],
        "spot_checks": sum(result["checks"] for result in inference + training),
        "server_peak_rss_mib": rss.peaks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inference", type=int, default=16, help="concurrent inference clients")
    parser.add_argument("--training", type=int, default=4, help="concurrent LoRA training clients")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per inference client")
    parser.add_argument("--steps", type=int, default=3, help="training steps per training client (batch 2 x 64)")
    parser.add_argument("--replicas", type=int, default=2, help="servers per half of the model (spot checks need 2+)")
    parser.add_argument("--verify-fraction", type=float, default=0.05, help="spot-check fraction of the second phase")
    parser.add_argument("--output", type=Path, default=Path("bench-results/bench_load.json"))
    args = parser.parse_args()
    os.environ.setdefault("SWARM_LOG_LEVEL", "WARNING")  # 20 clients log a route each; keep the table readable
    configure_logging()

    path = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts, expected = [], []
    for index in range(args.inference):
        text = f"Tell me one fact about {TOPICS[index % len(TOPICS)]}."
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        prompts.append(ids)
        with torch.inference_mode():
            out = local.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        expected.append(out[0, ids.shape[1]:].tolist())
    del local

    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_servers(path, ["0:15", "15:30"] * args.replicas, "--num-threads", "1")
        phases = [run_phase(path, swarm, prompts, expected, args, verify) for verify in (0.0, args.verify_fraction)]
    finally:
        swarm.stop()

    base, checked = phases
    print(f"\n{args.inference} inference clients x {args.tokens} tokens + {args.training} LoRA clients x {args.steps} steps, "
          f"default model, {2 * args.replicas} servers ({args.replicas} x 0:15, {args.replicas} x 15:30), wire none")
    print(f"{'verify':>7} {'wall s':>7} {'exact':>7} {'tok/s min':>10} {'median':>8} {'max':>7} {'slow/fast':>9} "
          f"{'train steps/s':>14} {'checks':>7} {'server peak RSS MiB':>20}")
    for phase in phases:
        train = statistics.mean(phase["training_steps_per_s"]) if phase["training_steps_per_s"] else 0.0
        rss = " / ".join(f"{value:.0f}" for value in phase["server_peak_rss_mib"])
        print(f"{phase['verify_fraction']:>7.2f} {phase['wall_s']:>7.1f} {phase['exact']:>3}/{phase['clients']:<3} "
              f"{phase['tokens_per_s_min']:>10.2f} {phase['tokens_per_s_median']:>8.2f} {phase['tokens_per_s_max']:>7.2f} "
              f"{phase['fairness_slowest_over_fastest']:>9.2f} {train:>14.3f} {phase['spot_checks']:>7} {rss:>20}")
    print(f"cost of verify_fraction={args.verify_fraction}: wall time x{checked['wall_s'] / base['wall_s']:.2f}, "
          f"median tokens/s x{checked['tokens_per_s_median'] / base['tokens_per_s_median']:.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "phases": phases}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
