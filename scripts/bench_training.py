#!/usr/bin/env python
"""One LoRA training step through a local swarm against plain local peft, same machine, same run.

A step is forward + backward + optimizer on a batch of 4 x 128 tokens of the default model, with
a LoRA (r=8 on the attention and MLP projections) trained through a 2-server local swarm, and the
same with transformers + peft in this process. Prints a table and writes JSON.

    python scripts/bench_training.py --output bench-results/training.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

# Before torch loads OpenMP: this process shares the cores with the servers (see
# swarm.client.local_processes.SHARED_CORES_ENV). It applies to the local baseline too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.cli.logs import configure_logging  # noqa: E402
from swarm.client.local_processes import LocalSwarm  # noqa: E402
from swarm.model_source import DEFAULT_MODEL, resolve_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def time_steps(model, batch: torch.Tensor, steps: int) -> list[float]:  # noqa: ANN001
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        began = time.perf_counter()
        optimizer.zero_grad()
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or alias (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setup (local: twice); medians are reported (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, locally and per server (default: %(default)s)")
    parser.add_argument("--codecs", nargs="*", default=["none", "int8"], help="wire codecs to measure (default: none int8)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/training.json"), help="JSON file (default: %(default)s)")
    args = parser.parse_args()
    configure_logging()
    torch.set_num_threads(args.threads)
    checkpoint = resolve_model(args.model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    batch = torch.randint(0, 49152, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))

    # Local steps run before and after the swarm's, so that drift of the machine hits both alike.
    local = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), config)
    local_times = time_steps(local, batch, args.steps)

    rows = {"local peft": local_times}
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_servers(checkpoint, ["0:15", "15:30"], "--num-threads", str(args.threads))
        for codec in args.codecs:
            remote = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers, wire_codec=codec)
            remote.add_adapter(config)
            rows[f"swarm, wire {codec}"] = time_steps(remote, batch, args.steps)
            remote.swarm_client.shutdown()
    finally:
        swarm.stop()
    local_times += time_steps(local, batch, args.steps)

    local_median = statistics.median(local_times)
    print(f"\nLoRA training step on {checkpoint.name}: batch {args.batch} x {args.seq_len} tokens, fp32, r=8 on all "
          f"projections, {args.threads} torch threads, servers 0:15 and 15:30, median of {args.steps}")
    print(f"{'setup':<20}{'step s':>9}{'vs local':>10}")
    result = {"model": checkpoint.name, "batch": args.batch, "seq_len": args.seq_len, "threads": args.threads, "setups": {}}
    for name, times in rows.items():
        median = statistics.median(times)
        result["setups"][name] = {"step_s": median, "ratio": median / local_median, "runs": times}
        print(f"{name:<20}{median:>9.3f}{median / local_median:>10.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
