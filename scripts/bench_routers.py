#!/usr/bin/env python
"""What routing among published adapters costs, against one held adapter and the base model, same run.

Makes N random LoRA adapters for the model (peft, one rank and set of targets), publishes them to a
local swarm, then times greedy generation of the same prompt through: the base model, one held
adapter, Arrow over the N adapters (top_k 1 and 2), and the prompt router over them; plus the
prompt router's choice alone (`route_adapter`) and the first Arrow request, which makes each server
compute the set's prototypes. Random adapters say nothing about accuracy (scripts/bench_adapters.py
measures that on real tasks); this is speed only. Prints a table and writes JSON.

    python scripts/bench_routers.py                    # default model, 2 servers, 3 adapters, 32 tokens
    python scripts/bench_routers.py --adapters 8 --repeats 5 --output bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # this process shares the cores with the servers

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from token_clock import TokenClock  # noqa: E402 (scripts/token_clock.py, beside this script)
from swarm.cli.logs import configure_logging  # noqa: E402
from swarm.client.local_processes import LocalSwarm  # noqa: E402
from swarm.client.local_swarm import split_blocks  # noqa: E402
from swarm.families import load_config  # noqa: E402
from swarm.model_source import DEFAULT_MODEL, resolve_model  # noqa: E402

logger = logging.getLogger("swarm.bench")

PROMPT = "Classify the sentiment of this review as positive or negative: the food was cold and the staff rude."


def make_adapters(checkpoint: Path, root: Path, count: int, rank: int) -> list[Path]:
    """`count` random (non-zero) LoRA adapters of one rank and set of targets, in peft's format."""
    folders = []
    for index in range(count):
        torch.manual_seed(index)
        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(base, config)
        with torch.no_grad():  # small updates, so that generation stays like the base model's
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.01)
        folder = root / f"task{index}"
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def measure(model, input_ids: torch.Tensor, new_tokens: int) -> dict:  # noqa: ANN001
    """One timed greedy generation: time to first token (ms), mean time per token after it (ms), tokens/s."""
    clock = TokenClock()
    began = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, stopping_criteria=[clock])
    ended = time.perf_counter()
    gaps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return {"ttft_ms": (clock.stamps[0] - began) * 1e3, "per_token_ms": statistics.mean(gaps) * 1e3,
            "tokens_per_s": new_tokens / (ended - began)}


def summarize(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]} | {"runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or alias (default: %(default)s)")
    parser.add_argument("--servers", type=int, default=2, help="servers splitting the blocks (default: %(default)s)")
    parser.add_argument("--adapters", type=int, default=3, help="adapters to route among (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="their LoRA rank (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setup; medians are reported (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, locally and per server (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/routers.json"), help="JSON file (default: %(default)s)")
    args = parser.parse_args()
    configure_logging()
    torch.set_num_threads(args.threads)

    checkpoint = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    blocks = load_config(checkpoint).num_hidden_layers
    swarm = LocalSwarm()
    rows: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folders = make_adapters(checkpoint, Path(tmp), args.adapters, args.rank)
            swarm.start_dht()
            ranges = split_blocks(blocks, args.servers)
            swarm.start_servers(checkpoint, ranges, "--num-threads", str(args.threads))
            remote = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers)
            names = []
            for index, folder in enumerate(folders):
                remote.load_adapter(str(folder), adapter_name=f"task{index}")
                remote.publish_adapter(f"task{index}", adapter_name=f"task{index}", identity_path=Path(tmp) / "publisher.key")
                names.append(f"swarm:task{index}")
        remote.load_adapter(names[0], adapter_name="held")
        measure(remote, input_ids, 2)  # warm-up

        def timed(name: str) -> None:
            rows[name] = summarize([measure(remote, input_ids, args.new_tokens) for _ in range(args.repeats)])

        remote.disable_adapters()
        timed("base model")
        remote.enable_adapters()
        remote.set_adapter("held")
        timed("one held adapter")
        for top_k in (1, 2):
            remote.set_adapter_router(names, method="arrow", top_k=top_k)
            if top_k == 1:
                first = measure(remote, input_ids, args.new_tokens)  # servers compute this set's prototypes
                rows["arrow: first call (prototypes)"] = summarize([first])
            timed(f"arrow over {len(names)}, top_k={top_k}")
        remote.set_adapter_router(names, method="prompt")
        began = time.perf_counter()
        choices = [remote.route_adapter(input_ids) for _ in range(args.repeats)]
        route_ms = (time.perf_counter() - began) / args.repeats * 1e3
        timed(f"prompt router over {len(names)}")
        remote.swarm_client.shutdown()
    finally:
        swarm.stop()

    reference = rows["one held adapter"]
    print(f"\nmodel {checkpoint.name}, fp32, {blocks} blocks on servers {', '.join(ranges)}, prompt {input_ids.shape[1]} tokens, "
          f"{args.new_tokens} new tokens, {args.adapters} adapters of rank {args.rank} (q_proj, v_proj), "
          f"{args.threads} torch thread(s) each, median of {args.repeats}; shared machine: compare ratios, not absolutes")
    print(f"{'setup':<34}{'TTFT ms':>10}{'per-token ms':>15}{'tokens/s':>10}{'per-token vs one adapter':>26}")
    for name, summary in rows.items():
        ratio = summary["per_token_ms"] / reference["per_token_ms"]
        print(f"{name:<34}{summary['ttft_ms']:>10.1f}{summary['per_token_ms']:>15.2f}{summary['tokens_per_s']:>10.2f}{ratio:>26.3f}")
    prompt_blocks = -(-blocks // 2)
    print(f"prompt router's choice alone (route_adapter, {prompt_blocks} of {blocks} blocks scored): {route_ms:.1f} ms; "
          f"chose {choices[0]}")
    result = {"model": checkpoint.name, "servers": ranges, "threads": args.threads, "adapters": args.adapters, "rank": args.rank,
              "prompt_tokens": input_ids.shape[1], "new_tokens": args.new_tokens, "repeats": args.repeats,
              "rows": rows, "route_adapter_ms": route_ms, "prompt_blocks": prompt_blocks, "choice": choices[0]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
