"""Training through the swarm: gradients of LoRA weights and prompts equal a local peft model's.

Real servers (three of them, fp32, uncompressed wire) hold the tiny model's blocks; the local
reference is plain transformers + peft with the very same adapter weights.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.local_processes import LocalSwarm
from tests.conftest import FAMILIES

pytestmark = pytest.mark.timeout(300)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_swarm(request, tiny_models):
    path = tiny_models[request.param]
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_servers(path, ["0:2", "2:4", "4:6"], "--num-threads", "1")
        yield path, swarm
    finally:
        swarm.stop()


def remote_model(path, swarm, **kwargs):  # noqa: ANN001, ANN003, ANN201
    return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, wire_codec="none", **kwargs)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 211, (2, 10), generator=torch.Generator().manual_seed(5))
    return ids, ids.clone()


def test_lora_gradients_match_local_peft(family_swarm, tmp_path):
    path, swarm = family_swarm
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    remote = remote_model(path, swarm)
    try:
        torch.manual_seed(0)
        remote.add_adapter(config, adapter_name="default")
        local = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), config)
        set_peft_model_state_dict(local, remote.swarm_adapters["default"].peft_state_dict())
        ids, labels = batch()
        remote_loss = remote(ids, labels=labels).loss
        local_loss = local(ids, labels=labels).loss
        torch.testing.assert_close(remote_loss, local_loss, atol=1e-5, rtol=0)
        remote_loss.backward()
        local_loss.backward()
        local_grads = {name.replace(".default", ""): p.grad for name, p in local.named_parameters() if p.requires_grad}
        lora = remote.swarm_adapters["default"]
        remote_grads = dict(zip(lora.peft_state_dict(), (t.grad for t in lora.tensors())))
        assert set(remote_grads) == set(local_grads) and len(remote_grads) == 6 * 7 * 2
        for name, grad in remote_grads.items():
            torch.testing.assert_close(grad, local_grads[name], atol=1e-5, rtol=1e-4, msg=name)
        assert [p for p in remote.parameters() if p.requires_grad] == list(lora.parameters())
    finally:
        remote.swarm_client.shutdown()


def test_prompt_gradients_match_local(family_swarm):
    path, swarm = family_swarm
    remote = remote_model(path, swarm, tuning_mode="deep_ptune", pre_seq_len=3)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    try:
        with torch.no_grad():
            remote.deep_prompts.normal_(std=0.1)
        prompts = remote.prompt_embeddings.weight.detach().clone().requires_grad_(True)
        deep = remote.deep_prompts.detach().clone().requires_grad_(True)
        hooks = [
            layer.register_forward_pre_hook(lambda m, args, kw, i=i: ((args[0] + torch.nn.functional.pad(deep[i], (0, 0, 0, args[0].shape[1] - 3)), *args[1:]), kw), with_kwargs=True)
            for i, layer in enumerate(local.model.layers)
        ]
        ids, labels = batch()
        embeds = torch.cat([prompts[None].expand(2, -1, -1), local.model.embed_tokens(ids)], dim=1)
        local_logits = local(inputs_embeds=embeds).logits[:, 3:]
        for hook in hooks:
            hook.remove()
        remote_logits = remote(ids).logits
        torch.testing.assert_close(remote_logits, local_logits, atol=1e-4, rtol=0)
        local_logits.square().mean().backward()
        remote_logits.square().mean().backward()
        torch.testing.assert_close(remote.prompt_embeddings.weight.grad, prompts.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(remote.deep_prompts.grad, deep.grad, atol=1e-5, rtol=1e-4)
    finally:
        remote.swarm_client.shutdown()
