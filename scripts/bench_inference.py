#!/usr/bin/env python
"""Inference speed of a local swarm against plain local transformers, same machine, same run.

For the same prompt and model (fp32), measures time to first token, per-token latency and
tokens/s for N new greedy tokens, through plain transformers in this process and through a local
swarm (a DHT and servers splitting the blocks), uncompressed and with the default wire codec, each
with server-to-server push (the default) and client-mediated (push=False).
Then prompt-lookup decoding (transformers' `prompt_lookup_num_tokens`, drafts verified in one pass
through the chain) against plain greedy on a prompt that repeats itself (rewriting a given
paragraph), locally and through the swarm with push: tokens/s, passes through the model, same tokens.
Prints tables and writes JSON.

    python scripts/bench_inference.py                 # default model, 2 servers, 64 tokens
    python scripts/bench_inference.py --servers 3 --repeats 5 --output bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

# Before torch loads OpenMP: this process shares the cores with the servers (see
# swarm.client.local_processes.SHARED_CORES_ENV). It applies to the local baseline too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from token_clock import TokenClock  # noqa: E402 (scripts/token_clock.py, beside this script)
from swarm.cli.logs import configure_logging  # noqa: E402
from swarm.client.local_processes import LocalSwarm  # noqa: E402
from swarm.client.local_swarm import split_blocks  # noqa: E402
from swarm.families import load_config  # noqa: E402
from swarm.model_source import DEFAULT_MODEL, resolve_model  # noqa: E402
from swarm.wire.codecs import DEFAULT_CODEC  # noqa: E402

logger = logging.getLogger("swarm.bench")

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# A prompt whose answer repeats it: prompt lookup drafts the next tokens from the paragraph itself.
REWRITE_PROMPT = (
    "Rewrite the following paragraph, correcting its spelling mistakes and changing nothing else:\n\n"
    "The old lighthouse stood on the edge of the cliff for more than a hundred years. Every night its keeper "
    "climbed the narrow stairs, lit the great lamp and watched the ships pass safely in the dark. One stormy "
    "evening he found a bottle on the rocks below, and inside it was a leter written by a sailor who had been "
    "lost at sea many years before."
)



def measure(model, input_ids: torch.Tensor, new_tokens: int, session_factory=None, **generate_kwargs) -> dict:  # noqa: ANN001, ANN003
    """One timed generation: time to first token (ms), mean time per pass after it (ms; a token each
    unless decoding is assisted), tokens/s, passes."""
    clock = TokenClock()
    began = time.perf_counter()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, stopping_criteria=[clock],
                  **generate_kwargs)
    with torch.inference_mode():
        if session_factory is None:
            output = model.generate(input_ids, **kwargs)
        else:
            with session_factory():
                output = model.generate(input_ids, **kwargs)
    ended = time.perf_counter()
    gaps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return {
        "ttft_ms": (clock.stamps[0] - began) * 1e3,
        "per_token_ms": statistics.mean(gaps) * 1e3,
        "tokens_per_s": new_tokens / (ended - began),
        "passes": len(clock.stamps),
        "tokens": output[0, input_ids.shape[1]:].tolist(),
    }


def summarize(runs: list[dict]) -> dict:
    keys = ("ttft_ms", "per_token_ms", "tokens_per_s", "passes")
    return {key: statistics.median(run[key] for run in runs) for key in keys} | {"runs": [{k: r[k] for k in keys} for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or alias (default: %(default)s)")
    parser.add_argument("--servers", type=int, default=2, help="servers splitting the blocks (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setup; medians are reported (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, locally and per server (default: %(default)s)")
    parser.add_argument("--codecs", nargs="*", default=["none", DEFAULT_CODEC], help="wire codecs to measure (default: none %(default)s)")
    parser.add_argument("--lookup-tokens", type=int, default=10,
                        help="prompt_lookup_num_tokens for the prompt-lookup rows (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/inference.json"), help="JSON file (default: %(default)s)")
    args = parser.parse_args()
    configure_logging()
    torch.set_num_threads(args.threads)

    checkpoint = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": PROMPT}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    rewrite_ids = tokenizer.apply_chat_template([{"role": "user", "content": REWRITE_PROMPT}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
    lookup = {"prompt_lookup_num_tokens": args.lookup_tokens}

    local = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    measure(local, input_ids, 4)  # warm-up
    local_runs = [measure(local, input_ids, args.new_tokens) for _ in range(args.repeats)]
    # (setup, decoding) -> runs on the rewrite prompt
    rewrite_runs = {("local", decoding): [measure(local, rewrite_ids, args.new_tokens, **extra) for _ in range(args.repeats)]
                    for decoding, extra in (("greedy", {}), ("prompt lookup", lookup))}
    del local

    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        ranges = split_blocks(load_config(checkpoint).num_hidden_layers, args.servers)
        swarm.start_servers(checkpoint, ranges, "--num-threads", str(args.threads))
        max_length = input_ids.shape[1] + args.new_tokens
        swarm_runs = {}
        for codec in args.codecs:
            for push in (True, False):  # server to server (the default), or every hop back through the client
                remote = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                                         wire_codec=codec, push=push)
                measure(remote, input_ids, 4)  # warm-up
                swarm_runs[codec if push else f"{codec} client-mediated"] = [
                    measure(remote, input_ids, args.new_tokens, lambda: remote.inference_session(max_length=max_length))
                    for _ in range(args.repeats)
                ]
                if push:
                    # Room for a draft that runs past the last token before verification cuts it.
                    rewrite_length = rewrite_ids.shape[1] + args.new_tokens + args.lookup_tokens
                    for decoding, extra in (("greedy", {}), ("prompt lookup", lookup)):
                        rewrite_runs[(f"swarm, wire {codec}", decoding)] = [
                            measure(remote, rewrite_ids, args.new_tokens,
                                    lambda: remote.inference_session(max_length=rewrite_length), **extra)
                            for _ in range(args.repeats)
                        ]
                remote.swarm_client.shutdown()
    finally:
        swarm.stop()

    local_summary = summarize(local_runs)
    rows = {"local": local_summary}
    result = {
        "model": str(checkpoint.name), "dtype": "float32", "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "servers": ranges, "threads": args.threads, "prompt_tokens": input_ids.shape[1], "new_tokens": args.new_tokens,
        "repeats": args.repeats, "local": local_summary, "swarm": {},
    }
    for codec, runs in swarm_runs.items():
        summary = summarize(runs)
        rows[f"swarm, wire {codec}"] = summary
        result["swarm"][codec] = summary | {
            "per_token_over_local": summary["per_token_ms"] / local_summary["per_token_ms"],
            "same_greedy_tokens_as_local": all(run["tokens"] == local_runs[0]["tokens"] for run in runs),
        }
    print(f"\nmodel {checkpoint.name}, fp32, prompt {input_ids.shape[1]} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} torch threads, servers {', '.join(ranges)}, median of {args.repeats}")
    print(f"{'setup':<34}{'TTFT ms':>10}{'per-token ms':>15}{'tokens/s':>10}{'per-token vs local':>20}{'same tokens':>13}")
    for name, summary in rows.items():
        codec = name.removeprefix("swarm, wire ")
        extra = result["swarm"].get(codec, {"per_token_over_local": 1.0, "same_greedy_tokens_as_local": True})
        print(f"{name:<34}{summary['ttft_ms']:>10.1f}{summary['per_token_ms']:>15.2f}{summary['tokens_per_s']:>10.2f}"
              f"{extra['per_token_over_local']:>20.3f}{str(extra['same_greedy_tokens_as_local']):>13}")
    result["prompt_lookup"] = prompt_lookup_table(rewrite_runs, rewrite_ids.shape[1], args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


def prompt_lookup_table(runs: dict[tuple[str, str], list[dict]], prompt_tokens: int, args: argparse.Namespace) -> dict:
    """Print prompt lookup against plain greedy on the rewrite prompt, per setup; return the rows for the JSON."""
    reference = runs[("local", "greedy")][0]["tokens"]
    print(f"\nprompt lookup ({args.lookup_tokens} draft tokens) vs greedy, rewriting a paragraph: prompt {prompt_tokens} "
          f"tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'setup':<18}{'decoding':<15}{'tokens/s':>10}{'passes':>8}{'speed-up':>10}{'same tokens as greedy':>23}")
    rows = {}
    for (setup, decoding), setup_runs in runs.items():
        summary = summarize(setup_runs)
        greedy_runs = runs[(setup, "greedy")]
        same = all(run["tokens"] == greedy_runs[0]["tokens"] for run in setup_runs)
        speedup = summary["tokens_per_s"] / statistics.median(run["tokens_per_s"] for run in greedy_runs)
        rows[f"{setup}, {decoding}"] = summary | {"speedup_over_greedy": speedup, "same_tokens_as_greedy": same,
                                                  "same_tokens_as_local_greedy": all(r["tokens"] == reference for r in setup_runs)}
        print(f"{setup:<18}{decoding:<15}{summary['tokens_per_s']:>10.2f}{summary['passes']:>8.0f}{speedup:>10.2f}{str(same):>23}")
    return rows


if __name__ == "__main__":
    main()
