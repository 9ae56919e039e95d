#!/usr/bin/env python
"""Fine-tune a LoRA for the default model through a local swarm, on a small checkable task.

The task (scripts/data/arithmetic.jsonl, 360 two-digit additions and subtractions, made once with
a fixed seed) asks for a fixed answer format: "The answer is N." The script starts a local swarm
(a DHT and two servers), trains a LoRA through it with the loss on the answer tokens only, shows
the model's answers before and after, scores held-out questions (format and value), and saves the
adapter in peft's format.

    python scripts/finetune.py --steps 60 --output adapters/arithmetic
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # this process shares the cores with its servers

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.adapter_files import PROVENANCE_FILE  # noqa: E402
from swarm.cli.logs import configure_logging  # noqa: E402
from swarm.client.local_processes import LocalSwarm  # noqa: E402
from swarm.model_source import DEFAULT_MODEL, resolve_model  # noqa: E402

logger = logging.getLogger("swarm.finetune")
DATA = Path(__file__).parent / "data" / "arithmetic.jsonl"
HELD_OUT = 40
ANSWER = re.compile(r"^The answer is (-?\d+)\.$")


def chat_ids(tokenizer, question: str) -> list[int]:  # noqa: ANN001
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def make_batch(tokenizer, pairs: list[tuple[list[int], str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Right-padded input ids, attention mask, and labels that are -100 everywhere but the answers.

    `pairs` are (prompt token ids, answer text); the answer is followed by the end of the turn."""
    sequences, label_rows = [], []
    for prompt, reply in pairs:
        answer = tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
        sequences.append(prompt + answer)
        label_rows.append([-100] * len(prompt) + answer)
    width = max(map(len, sequences))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for lab in label_rows])
    return ids, mask, labels


@torch.inference_mode()
def answer(model, tokenizer, question: str) -> str:  # noqa: ANN001
    ids = torch.tensor([chat_ids(tokenizer, question)])
    output = model.generate(ids, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def score(model, tokenizer, rows: list[dict]) -> tuple[float, float]:  # noqa: ANN001
    """Fractions of replies in the exact format, and with the right value."""
    formatted = correct = 0
    for row in rows:
        match = ANSWER.match(answer(model, tokenizer, row["question"]))
        formatted += match is not None
        correct += match is not None and int(match.group(1)) == row["result"]
    return formatted / len(rows), correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or alias (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("adapters/arithmetic"), help="where to save the adapter (default: %(default)s)")
    args = parser.parse_args()
    configure_logging()
    torch.manual_seed(0)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    train, held_out = rows[HELD_OUT:], rows[:HELD_OUT]
    checkpoint = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_servers(checkpoint, ["0:15", "15:30"], "--num-threads", "2")
        model = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers)
        examples = [row["question"] for row in held_out[:3]]
        before = {question: answer(model, tokenizer, question) for question in examples}
        before_score = score(model, tokenizer, held_out)

        model.add_adapter(LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        rng = random.Random(0)
        progress = tqdm(range(args.steps), desc="training through the swarm")
        for step in progress:
            ids, mask, labels = make_batch(tokenizer, [(chat_ids(tokenizer, row["question"]), row["answer"])
                                                     for row in rng.sample(train, args.batch)])
            optimizer.zero_grad()
            loss = model(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
            logger.info("step %d loss %.4f", step + 1, loss.item())

        after = {question: answer(model, tokenizer, question) for question in examples}
        after_score = score(model, tokenizer, held_out)
        model.save_pretrained(args.output)
        digest = hashlib.sha256(DATA.read_bytes()).hexdigest()
        (args.output / PROVENANCE_FILE).write_text(
            f"scripts/finetune.py on {DATA.name} (sha256 {digest}), {len(train)} training rows; "
            f"{args.steps} steps of {args.batch}, AdamW lr {args.lr}, LoRA rank {args.rank}\n")
        model.swarm_client.shutdown()
    finally:
        swarm.stop()

    for question in examples:
        print(f"\nQ: {question}\n  before: {before[question]!r}\n  after:  {after[question]!r}")
    print(f"\nheld-out {HELD_OUT} questions: exact format {before_score[0]:.0%} -> {after_score[0]:.0%}, "
          f"right value {before_score[1]:.0%} -> {after_score[1]:.0%}")
    print(f"adapter saved to {args.output} (loads with peft.PeftModel.from_pretrained; `swarm-adapter publish {args.output} --name NAME` shares it)")


if __name__ == "__main__":
    main()
