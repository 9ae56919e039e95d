"""Training through the swarm: gradients of LoRA weights and prompts equal a local peft model's.

Real servers (three of them, fp32, uncompressed wire) hold the tiny model's blocks; the local
reference is plain transformers + peft with the very same adapter weights.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.local_processes import LocalSwarm

pytestmark = pytest.mark.timeout(300)

PHI3_FUSED = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
}


def targets(path, *names: str) -> list[str]:  # noqa: ANN001
    """LoRA target names in the tiny model's own spelling: Phi-3 fuses q/k/v and gate/up projections."""
    return sorted({PHI3_FUSED.get(name, name) for name in names}) if path.name == "phi3" else list(names)


@pytest.fixture(scope="module")
def family_swarm(three_servers):
    return three_servers


def remote_model(path, swarm, **kwargs):  # noqa: ANN001, ANN003, ANN201
    return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, wire_codec="none", **kwargs)


def assert_grads_match_local_peft(remote, path, ids: torch.Tensor) -> None:  # noqa: ANN001
    """The remote LoRA's gradients equal those of a local peft model with the same weights on `ids`."""
    lora = remote.swarm_adapters["default"]
    local = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), lora.peft_config)
    set_peft_model_state_dict(local, lora.peft_state_dict())
    local(ids, labels=ids).loss.backward()
    expected = {n.replace(".default", ""): p.grad for n, p in local.named_parameters() if p.requires_grad}
    for name, tensor in zip(lora.peft_state_dict(), lora.tensors()):
        torch.testing.assert_close(tensor.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture
def replicated_llama(tiny_models):
    """Two servers holding all 6 blocks of the tiny llama, logging at DEBUG: (path, swarm, servers)."""
    path = tiny_models["llama"]
    swarm = LocalSwarm(server_env={"SWARM_LOG_LEVEL": "DEBUG"})
    try:
        swarm.start_dht()
        servers = swarm.start_servers(path, ["0:6", "0:6"], "--num-threads", "1", "--throughput", "100")
        yield path, swarm, servers
    finally:
        swarm.stop()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 211, (2, 10), generator=torch.Generator().manual_seed(5))
    return ids, ids.clone()


def test_lora_gradients_match_local_peft(family_swarm, tmp_path):
    path, swarm = family_swarm
    # "all-linear" is every linear layer of the blocks, whatever the family calls them (peft's shorthand);
    # on a mixture of experts peft would also adapt the experts, which remote blocks refuse (test_families)
    all_linear = targets(path, "q_proj", "k_proj", "v_proj", "o_proj") if path.name == "mixtral" else "all-linear"
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=all_linear, init_lora_weights=False)
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
        linears_per_block = {"phi3": 4, "mixtral": 4}.get(path.name, 7)  # Mixtral's experts are not nn.Linear
        assert set(remote_grads) == set(local_grads) and len(remote_grads) == 6 * linears_per_block * 2
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


def test_training_lowers_the_loss_and_the_adapter_round_trips_through_peft(family_swarm, tmp_path):
    path, swarm = family_swarm
    remote = remote_model(path, swarm)
    try:
        remote.add_adapter(LoraConfig(r=8, lora_alpha=16, target_modules=targets(path, "q_proj", "v_proj")), adapter_name="trained")
        optimizer = torch.optim.Adam([p for p in remote.parameters() if p.requires_grad], lr=1e-2)
        ids, labels = batch()
        losses = []
        for _ in range(10):
            optimizer.zero_grad()
            loss = remote(ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.4, losses

        remote.save_pretrained(tmp_path / "adapter")
        assert {f.name for f in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tmp_path / "adapter")
        with torch.no_grad():
            torch.testing.assert_close(remote(ids).logits, local(ids).logits, atol=1e-4, rtol=0)
            remote.disable_adapters()
            plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            torch.testing.assert_close(remote(ids).logits, plain(ids).logits, atol=1e-4, rtol=0)
            remote.enable_adapters()
            # Generation uses the adapter too, through the servers' sessions.
            expected = local.generate(input_ids=ids[:1, :5], max_new_tokens=8, do_sample=False, eos_token_id=None)
            assert torch.equal(remote.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, eos_token_id=None), expected)
    finally:
        remote.swarm_client.shutdown()


def test_an_adapter_trained_with_local_peft_loads_into_the_swarm(family_swarm, tmp_path):
    path, swarm = family_swarm
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["o_proj", "down_proj"], init_lora_weights=False)
    local = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), config)
    local.save_pretrained(tmp_path / "local-adapter")
    remote = remote_model(path, swarm)
    try:
        remote.load_adapter(tmp_path / "local-adapter", adapter_name="imported")
        assert remote.active_adapters() == ["imported"]
        ids, _ = batch()
        with torch.no_grad():
            torch.testing.assert_close(remote(ids).logits, local(ids).logits, atol=1e-4, rtol=0)
    finally:
        remote.swarm_client.shutdown()


def test_two_clients_training_different_adapters_do_not_mix(family_swarm):
    """Two clients interleave forward and backward on the same servers; each gets its own gradients."""
    path, swarm = family_swarm
    clients = [remote_model(path, swarm), remote_model(path, swarm)]
    try:
        ids, labels = batch()
        for seed, client in enumerate(clients):
            torch.manual_seed(seed)
            client.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets(path, "q_proj"), init_lora_weights=False))
        losses = [client(ids, labels=labels).loss for client in clients]  # both forwards kept on the servers
        for loss in reversed(losses):
            loss.backward()
        for client in clients:
            assert_grads_match_local_peft(client, path, ids)
    finally:
        for client in clients:
            client.swarm_client.shutdown()


def test_batches_are_split_over_replicated_servers(replicated_llama):
    """Two servers hold every block: a batch goes half to each, and the gradients stay exact."""
    path, swarm, servers = replicated_llama
    remote = remote_model(path, swarm)
    try:
        remote.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
        ids = torch.randint(3, 211, (4, 9), generator=torch.Generator().manual_seed(11))
        remote(ids, labels=ids).loss.backward()
        assert_grads_match_local_peft(remote, path, ids)
        for _ in range(6):  # parts draw their routes by throughput: over a few steps, both servers get some
            remote(ids, labels=ids).loss.backward()
        assert all(any("forward (kept) compute" in line for line in server.lines) for server in servers)
    finally:
        remote.swarm_client.shutdown()


def kept_forward_holder(servers: list) -> object:
    """The one server that logged keeping a forward; its log line may reach us just after the reply."""
    deadline = time.monotonic() + 10
    while not (holders := [server for server in servers if any("forward (kept) compute" in line for line in server.lines)]):
        assert time.monotonic() < deadline, "no server logged a kept forward"
        time.sleep(0.05)
    (holder,) = holders
    return holder


def test_backward_survives_the_death_of_the_forward_server(replicated_llama):
    """The server that kept the forward dies before backward: backward recomputes on the other replica."""
    path, swarm, servers = replicated_llama
    remote = remote_model(path, swarm)
    try:
        remote.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"], init_lora_weights=False))
        ids = torch.randint(3, 211, (1, 9), generator=torch.Generator().manual_seed(12))
        loss = remote(ids, labels=ids).loss
        holder = kept_forward_holder(servers)
        os.killpg(holder.pid, signal.SIGKILL)
        holder.popen.wait(10)
        loss.backward()
        assert_grads_match_local_peft(remote, path, ids)
        (survivor,) = [server for server in servers if server is not holder]
        assert any("backward for blocks 0:6: recompute" in line for line in survivor.lines)
    finally:
        remote.swarm_client.shutdown()
