"""The embedded default model (SmolLM2-135M-Instruct) over two real servers.

Uncompressed, it generates exactly the tokens of local transformers. With the default wire codec
(int8), its next-token choices agree with the uncompressed model's within the bound measured by
scripts/bench_codecs.py (97% there; this test allows 90% on its shorter sample). Servers with
int8 and nf4 weights serve it too, and a LoRA trains through them (QLoRA over the swarm).
Assisted generation (prompt lookup, and the model itself loaded locally as the assistant) gives
exactly greedy's tokens in fewer inference steps than tokens.
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
from swarm.wire.codecs import DEFAULT_CODEC, decode, encode
from tests.conftest import served_counts

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


REWRITE = ("Rewrite this paragraph in a formal tone: The old lighthouse stood on the edge of the cliff for more than "
           "a hundred years. Every night its keeper climbed the narrow stairs and lit the great lamp.")


@pytest.mark.parametrize("assistance", ["prompt_lookup", "assistant_model"])
def test_assisted_generation_equals_greedy(fp32_swarm, local_model, checkpoint, assistance):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": REWRITE}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    new_tokens = 32
    expected = local_model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    extra = {"prompt_lookup_num_tokens": 10} if assistance == "prompt_lookup" else {"assistant_model": local_model}
    remote = AutoDistributedModelForCausalLM.from_pretrained("smollm2", initial_peers=fp32_swarm.initial_peers, wire_codec="none")
    try:
        before = served_counts(remote)
        produced = remote.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **extra)
        after = served_counts(remote)
    finally:
        remote.swarm_client.shutdown()
    assert torch.equal(produced, expected), tokenizer.decode(produced[0, prompt.shape[1]:])
    steps = {peer: after[peer].inference_steps - before[peer].inference_steps for peer in before}
    assert len(steps) == 2 and all(0 < count < new_tokens // 2 for count in steps.values()), steps


def test_nf4o_codec_through_the_swarm(fp32_swarm, local_model, prompt_ids):
    """The swarm with nf4o on the wire computes what the local model computes with nf4o applied where
    the swarm sends hidden states (into and out of each server), and stays close to uncompressed."""
    sequence = local_model.generate(prompt_ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    remote = AutoDistributedModelForCausalLM.from_pretrained("smollm2", initial_peers=fp32_swarm.initial_peers, wire_codec="nf4o")
    layers = local_model.model.layers
    hooks = [layers[i].register_forward_pre_hook(lambda m, args: (decode(encode(args[0], "nf4o")), *args[1:])) for i in (0, 15)]
    hooks += [layers[i].register_forward_hook(lambda m, args, output: decode(encode(output, "nf4o"))) for i in (14, 29)]
    try:
        with torch.no_grad():
            through_swarm = remote(sequence).logits
            simulated = local_model(sequence).logits
    finally:
        for hook in hooks:
            hook.remove()
        remote.swarm_client.shutdown()
    with torch.no_grad():
        reference = local_model(sequence).logits
    new = slice(prompt_ids.shape[1], None)
    same_as_simulated = (through_swarm[:, new].argmax(-1) == simulated[:, new].argmax(-1)).float().mean().item()
    same_as_uncompressed = (through_swarm[:, new].argmax(-1) == reference[:, new].argmax(-1)).float().mean().item()
    assert same_as_simulated >= 0.95 and same_as_uncompressed >= 0.75, (same_as_simulated, same_as_uncompressed)
