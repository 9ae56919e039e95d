"""The embedded default model (SmolLM2-135M-Instruct) over two real servers.

Uncompressed, it generates exactly the tokens of local transformers. With the default wire codec
(int8), its next-token choices agree with the uncompressed model's within the bound measured by
scripts/bench_codecs.py (97% there; this test allows 90% on its shorter sample). Servers with
int8 and nf4 weights serve it too, and a LoRA trains through them (QLoRA over the swarm).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.client.local_processes import LocalSwarm
from swarm.dht import fetch_block_records
from swarm.model_source import resolve_model
from swarm.wire.codecs import DEFAULT_CODEC

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def checkpoint():
    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def prompt_ids(checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def local_model(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fp32_swarm(checkpoint):
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_servers(checkpoint, ["0:15", "15:30"], "--num-threads", "1")
        yield swarm
    finally:
        swarm.stop()


def test_uncompressed_generation_equals_local(fp32_swarm, local_model, prompt_ids, checkpoint):
    expected = local_model.generate(prompt_ids, max_new_tokens=24, do_sample=False)
    remote = AutoDistributedModelForCausalLM.from_pretrained("smollm2", initial_peers=fp32_swarm.initial_peers, wire_codec="none")
    try:
        produced = remote.generate(prompt_ids, max_new_tokens=24, do_sample=False)
    finally:
        remote.swarm_client.shutdown()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert torch.equal(produced, expected), tokenizer.decode(produced[0])
    assert "Paris" in tokenizer.decode(produced[0, prompt_ids.shape[1]:])


def test_default_codec_agrees_with_uncompressed(fp32_swarm, local_model, prompt_ids):
    assert DEFAULT_CODEC == "int8"
    sequence = local_model.generate(prompt_ids, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    remote = AutoDistributedModelForCausalLM.from_pretrained("smollm2", initial_peers=fp32_swarm.initial_peers)
    try:
        with torch.no_grad():
            compressed = remote(sequence).logits
            reference = local_model(sequence).logits
        new = slice(prompt_ids.shape[1], None)
        agreement = (compressed[:, new].argmax(-1) == reference[:, new].argmax(-1)).float().mean().item()
        assert agreement >= 0.9
        produced = remote.generate(prompt_ids, max_new_tokens=16, do_sample=False)
        assert produced.shape[1] > prompt_ids.shape[1]
    finally:
        remote.swarm_client.shutdown()


def test_quantized_servers_serve_the_default_model(checkpoint, prompt_ids):
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_server(checkpoint, "0:15", "--num-threads", "1", "--quant-type", "nf4", "--throughput", "100", wait=False)
        swarm.start_server(checkpoint, "15:30", "--num-threads", "1", "--quant-type", "int8", "--throughput", "100", wait=False)
        for server in swarm.processes[1:]:
            server.wait_for_line("serving blocks")
        remote = AutoDistributedModelForCausalLM.from_pretrained("smollm2", initial_peers=swarm.initial_peers)
        try:
            produced = remote.generate(prompt_ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            assert produced.shape[1] == prompt_ids.shape[1] + 12
            blocks = fetch_block_records(remote.swarm_client.dht, remote.swarm_client.dht_prefix, 30)
            assert {record.quant_type for records in blocks for record in records.values()} == {"nf4", "int8"}
            # QLoRA over the swarm: the quantized base stays frozen, the client's LoRA gets gradients.
            remote.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
            remote(prompt_ids, labels=prompt_ids).loss.backward()
            grads = [p.grad for p in remote.parameters() if p.requires_grad]
            assert len(grads) == 2 * 2 * 30 and all(g is not None and torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)
        finally:
            remote.swarm_client.shutdown()
    finally:
        swarm.stop()
