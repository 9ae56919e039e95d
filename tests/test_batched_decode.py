"""Decode steps of concurrent sessions merged into one forward on real servers: every session still
gets exactly the tokens of local transformers, and the servers' counters show the merges happened.

The default model makes a step cost tens of milliseconds, so steps of concurrent sessions pile up
while the server computes and are merged; sessions differ in prompt length (hence positions), batch
and padding, and one runs beam search (its cache is reordered between merged steps).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.client.local_processes import LocalSwarm
from swarm.model_source import resolve_model
from tests.conftest import local_and_remote, served_counts

pytestmark = pytest.mark.timeout(600)

NEW_TOKENS = 12
QUESTIONS = ["What is the capital of France?", "Name three rivers in Europe and say which is longest.", "Hi!",
             "Write one sentence about lighthouses at night, please."]


def generate_all(model: torch.nn.Module, jobs: list[dict], barrier: threading.Barrier | None = None) -> list[torch.Tensor]:
    def run(job: dict) -> torch.Tensor:
        if barrier is not None:
            barrier.wait()
        return model.generate(**job, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    if barrier is None:
        return [run(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        return [future.result() for future in [pool.submit(run, job) for job in jobs]]


def test_concurrent_sessions_are_merged_and_exact_on_the_default_model():
    checkpoint = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.padding_side = "left"

    def chat(question: str) -> torch.Tensor:
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]

    padded = tokenizer([QUESTIONS[0], QUESTIONS[1]], return_tensors="pt", padding=True)
    jobs = [{"input_ids": chat(question)} for question in QUESTIONS]  # different lengths, hence positions
    jobs.append({"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]})  # batch 2, left pads
    jobs.append({"input_ids": chat(QUESTIONS[2]), "num_beams": 2})  # reorders its cache between steps

    local = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    expected = generate_all(local, jobs)
    del local
    swarm = LocalSwarm()
    remote = None
    try:
        swarm.start_dht()
        swarm.start_servers(checkpoint, ["0:15", "15:30"], "--num-threads", "1")
        remote = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers, wire_codec="none")
        before = served_counts(remote)
        produced = generate_all(remote, jobs, threading.Barrier(len(jobs)))
        after = served_counts(remote)
    finally:
        if remote is not None:
            remote.swarm_client.shutdown()
        swarm.stop()
    for job, want, got in zip(jobs, expected, produced):
        assert torch.equal(got, want), (job, want, got)
    for peer, counts in after.items():
        merged_steps = counts.merged_steps - before[peer].merged_steps
        merged_forwards = counts.merged_forwards - before[peer].merged_forwards
        steps = counts.inference_steps - before[peer].inference_steps
        assert merged_forwards > 0 and 2 * merged_forwards <= merged_steps <= steps, (peer, counts)


def test_merging_can_be_turned_off(tiny_models):
    """--max-merged-steps 1: every step runs alone, tokens unchanged."""
    prompts = [torch.randint(3, 211, (1, 4 + 3 * index), generator=torch.Generator().manual_seed(index)) for index in range(4)]
    with local_and_remote(tiny_models["llama"], "--max-merged-steps", "1") as (local, remote):
        expected = generate_all(local, [{"input_ids": prompt, "eos_token_id": None} for prompt in prompts])
        jobs = [{"input_ids": prompt, "eos_token_id": None} for prompt in prompts]
        produced = generate_all(remote, jobs, threading.Barrier(len(jobs)))
        counts = served_counts(remote)
    assert all(torch.equal(got, want) for got, want in zip(produced, expected))
    assert all(c.merged_forwards == 0 and c.merged_steps == 0 and c.inference_steps > 0 for c in counts.values()), counts
