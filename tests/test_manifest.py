"""A model is identified by its manifest: the same id however the tensors are split into files; a
server starts from a folder holding only its blocks' tensors and the manifest; every tensor loaded is
verified, and what does not match gets an error naming it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.local_processes import LocalSwarm
from swarm.errors import ConfigError
from swarm.families import family_of, load_config
from swarm.manifest import MANIFEST_FILE, load_manifest
from swarm.model_id import model_dht_prefix
from swarm.server.block_loader import load_span_layers
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.timeout(240)


def write_manifest(checkpoint: Path) -> str:
    """`swarm-model manifest` as a user runs it; returns what it printed."""
    result = subprocess.run([sys.executable, "-m", "swarm.cli.model", "manifest", str(checkpoint)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def only_blocks(source: Path, target: Path, blocks: range) -> Path:
    """A folder with the config, the manifest and the tensors of `blocks` only, as a volunteer would hold."""
    target.mkdir()
    shutil.copy(source / "config.json", target)
    shutil.copy(source / MANIFEST_FILE, target)
    tensors = load_file(source / "model.safetensors")
    prefixes = tuple(f"model.layers.{index}." for index in blocks)
    save_file({name: tensor for name, tensor in tensors.items() if name.startswith(prefixes)}, target / "blocks.safetensors")
    return target


@pytest.fixture(scope="module")
def with_manifest(tiny_models, tmp_path_factory) -> Path:
    checkpoint = tmp_path_factory.mktemp("manifest") / "llama"
    shutil.copytree(tiny_models["llama"], checkpoint)
    assert "model id llama-6x64-" in write_manifest(checkpoint)
    return checkpoint


def test_the_id_does_not_depend_on_the_files(tiny_models, tmp_path):
    single = tiny_models["llama"]
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 3
    assert model_dht_prefix(sharded) == model_dht_prefix(single)
    assert model_dht_prefix(save_tiny_model("llama", tmp_path / "other-seed", seed=1)) != model_dht_prefix(single)


def test_a_server_holding_only_its_blocks_serves_with_parity(with_manifest, tmp_path):
    partial = only_blocks(with_manifest, tmp_path / "blocks-3-6", range(3, 6))
    assert model_dht_prefix(partial) == model_dht_prefix(with_manifest)  # identified by the manifest it carries
    local = AutoModelForCausalLM.from_pretrained(with_manifest, dtype=torch.float32).eval()
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_server(with_manifest, "0:3", "--num-threads", "1")
        swarm.start_server(partial, "3:6", "--num-threads", "1")
        remote = AutoDistributedModelForCausalLM.from_pretrained(with_manifest, initial_peers=swarm.initial_peers, wire_codec="none")
        try:
            prompt = torch.tensor([[7, 8, 9, 10]])
            produced = remote.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
            assert torch.equal(produced, local.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None))
        finally:
            remote.swarm_client.shutdown()
    finally:
        swarm.stop()


def test_blocks_the_folder_lacks_are_named(with_manifest, tmp_path):
    partial = only_blocks(with_manifest, tmp_path / "blocks-3-6", range(3, 6))
    config = load_config(partial)
    with pytest.raises(ConfigError, match=r"has no weights for blocks \[1, 2\]"):
        load_span_layers(partial, config, family_of(config), 1, 4, torch.float32)


def test_a_corrupt_tensor_is_refused_by_name(with_manifest, tmp_path):
    damaged = only_blocks(with_manifest, tmp_path / "damaged", range(0, 6))
    tensors = load_file(damaged / "blocks.safetensors")
    tensors["model.layers.4.mlp.down_proj.weight"][0, 0] += 1.0
    save_file(tensors, damaged / "blocks.safetensors")
    config = load_config(damaged)
    load_span_layers(damaged, config, family_of(config), 0, 4, torch.float32)  # the blocks before are fine
    with pytest.raises(ConfigError, match="tensor model.layers.4.mlp.down_proj.weight in .* does not match the model's manifest"):
        load_span_layers(damaged, config, family_of(config), 4, 6, torch.float32)


def test_a_manifest_of_another_config_is_refused(with_manifest, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(with_manifest, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 0.1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="does not match the config"):
        load_manifest(other)
    (other / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="is malformed"):
        load_manifest(other)


def test_a_manifest_needs_the_whole_model(with_manifest, tmp_path):
    partial = only_blocks(with_manifest, tmp_path / "partial", range(3, 6))
    (partial / MANIFEST_FILE).unlink()
    result = subprocess.run([sys.executable, "-m", "swarm.cli.model", "manifest", str(partial)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "lacks the tensors of block:0, block:1, block:2" in result.stderr, result.stderr
