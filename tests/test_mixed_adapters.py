"""Sessions with different held adapters (and one with none) merged into one forward on real servers:
each session gets exactly local peft's tokens and logits with its own adapter, and the servers'
counters show that their decode steps ran merged (server/mixed_lora.py).

The default model makes a step cost tens of milliseconds, so the steps of concurrent sessions pile
up while a server computes and are merged (as in tests/test_batched_decode.py). The adapters differ
in rank (4, 8, 16), target modules and rsLoRA, and are published by name, so requests carry only
their hashes.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.adapter_files import read_peft_folder
from swarm.client.adapter_registry import AdapterRegistry, load_signer
from swarm.client.local_processes import LocalSwarm
from swarm.model_id import model_dht_prefix
from swarm.model_source import resolve_model
from tests.conftest import served_counts

pytestmark = pytest.mark.timeout(600)

NEW_TOKENS = 10
ADAPTERS = {  # name: LoraConfig options
    "alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "beta": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    "gamma": dict(r=16, lora_alpha=16, target_modules=["v_proj", "up_proj"]),
}
SESSIONS = [("alpha", "What is the capital of France?"), ("beta", "Name three rivers in Europe."), ("gamma", "Hi!"),
            (None, "Write one sentence about lighthouses at night, please.")]


def make_adapter(checkpoint: Path, directory: Path, seed: int, options: dict) -> None:
    """A random LoRA that changes the model's answers without drowning it (B small, not zero)."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                           LoraConfig(init_lora_weights="gaussian", lora_dropout=0.0, **options))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    model.save_pretrained(directory)


def wait_until_announced(registry: AdapterRegistry, digest: str, holders: int, timeout: float = 30.0) -> None:
    """Servers announce what they hold within about a second of storing it."""
    deadline = time.monotonic() + timeout
    while len(registry.holders(digest)) < holders:
        assert time.monotonic() < deadline, f"adapter {digest[:12]} not announced by {holders} servers in {timeout} s"
        time.sleep(0.2)


def generate(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (1, prompt + new) and the logits of each new token (new, vocab)."""
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.cat(out.logits)


def test_sessions_with_different_held_adapters_merge_and_equal_local_peft(tmp_path):
    checkpoint = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"] for _, question in SESSIONS]
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        make_adapter(checkpoint, tmp_path / name, seed, options)
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                                      tmp_path / "alpha", adapter_name="alpha").eval()
    for name in ("beta", "gamma"):
        local.load_adapter(tmp_path / name, adapter_name=name)
    expected = []
    with torch.inference_mode():
        for (name, _), ids in zip(SESSIONS, prompts):
            if name is None:
                with local.disable_adapter():
                    expected.append(generate(local, ids))
            else:
                local.set_adapter(name)
                expected.append(generate(local, ids))
        with local.disable_adapter():
            base = generate(local, prompts[0])[0]
    assert not torch.equal(base, expected[0][0])  # the adapters change the answers
    del local

    swarm = LocalSwarm()
    remote = None
    try:
        swarm.start_dht()
        swarm.start_servers(checkpoint, ["0:15", "15:30"], "--num-threads", "1")
        remote = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers, wire_codec="none")
        registry, signer = AdapterRegistry(remote.swarm_client), load_signer(tmp_path / "publisher.key")
        for name in ADAPTERS:
            manifest, tensors = read_peft_folder(tmp_path / name, model_dht_prefix(checkpoint), "model.layers.", 1 << 30)
            registry.publish(manifest, tensors, name, signer)
            wait_until_announced(registry, manifest.hash, holders=2)
            remote.load_adapter(f"swarm:{name}", adapter_name=name)
        opening, barrier = threading.Lock(), threading.Barrier(len(SESSIONS))

        def run(name: str | None, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with opening:  # the adapter is fixed when the session opens; the model's active adapter is shared
                if name is None:
                    remote.disable_adapters()
                else:
                    remote.set_adapter(name)
                session = remote.inference_session(max_length=ids.shape[1] + NEW_TOKENS)
                session.__enter__()
            try:
                barrier.wait()
                with torch.inference_mode():
                    return generate(remote, ids)
            finally:
                session.__exit__(None, None, None)

        before = served_counts(remote)
        with ThreadPoolExecutor(len(SESSIONS)) as pool:
            produced = [future.result() for future in [pool.submit(run, name, ids) for (name, _), ids in zip(SESSIONS, prompts)]]
        after = served_counts(remote)
    finally:
        if remote is not None:
            remote.swarm_client.shutdown()
        swarm.stop()
    for (name, _), (want_tokens, want_logits), (tokens, logits) in zip(SESSIONS, expected, produced):
        assert torch.equal(tokens, want_tokens), name
        torch.testing.assert_close(logits, want_logits, atol=2e-3, rtol=1e-3)
    for peer, counts in after.items():
        merged_steps = counts.merged_steps - before[peer].merged_steps
        merged_forwards = counts.merged_forwards - before[peer].merged_forwards
        # every merged forward holds at least two of the four sessions, so at least one with an adapter
        assert merged_forwards > 0 and 2 * merged_forwards <= merged_steps, (peer, counts)
