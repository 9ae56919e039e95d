"""The embedded default model (SmolLM2-135M-Instruct) split over two servers matches local transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.client.local_processes import LocalSwarm
from swarm.model_source import resolve_model

pytestmark = pytest.mark.timeout(600)


def test_default_model_over_two_servers_generates_like_local():
    checkpoint = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    local = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    expected = local.generate(input_ids, max_new_tokens=24, do_sample=False)

    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_servers(checkpoint, ["0:15", "15:30"], "--num-threads", "1")
        remote = AutoDistributedModelForCausalLM.from_pretrained("smollm2", initial_peers=swarm.initial_peers)
        try:
            produced = remote.generate(input_ids, max_new_tokens=24, do_sample=False)
        finally:
            remote.swarm_client.shutdown()
    finally:
        swarm.stop()
    assert torch.equal(produced, expected), tokenizer.decode(produced[0])
    assert "Paris" in tokenizer.decode(produced[0, input_ids.shape[1]:])
