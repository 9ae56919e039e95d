"""Fixtures: tiny random models of each supported family, saved as real checkpoints, and local swarms."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen3Config,
)

from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from swarm.client.local_processes import LocalSwarm
from swarm.transport import call_unary
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.rpc import RPC_INFO

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=211, max_position_embeddings=512, tie_word_embeddings=False,
    ),
    # A sliding window of 4 tokens, so that every test of a session crosses it (and rolls back past it).
    "mistral": lambda: MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=211, max_position_embeddings=512, sliding_window=4, tie_word_embeddings=False,
    ),
    "qwen3": lambda: Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=211, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    # Fused qkv_proj and gate_up_proj.
    "phi3": lambda: Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=211, max_position_embeddings=512, original_max_position_embeddings=512, pad_token_id=0,
        tie_word_embeddings=False,
    ),
    # Sliding (window 4, rope base 1e4) and global (rope base 1e6) layers alternate, so every 2-block
    # server holds both kinds; embeddings scaled by sqrt(hidden); q/k norms.
    "gemma3_text": lambda: Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=211, max_position_embeddings=512, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 3, pad_token_id=0, tie_word_embeddings=True,
    ),
    # Mixture of experts: 4 experts, 2 per token, routed inside each block.
    "mixtral": lambda: MixtralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=211, max_position_embeddings=512, num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False,
    ),
}
FAMILIES = sorted(TINY_CONFIGS)


def save_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    """A randomly initialised model of `family`, saved with save_pretrained so real loading runs on it."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family]()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norm weights, so that a mix-up of norms cannot pass unnoticed
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture
def local_swarm() -> Iterator[LocalSwarm]:
    swarm = LocalSwarm()
    try:
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module", params=FAMILIES)
def three_servers(request, tiny_models) -> Iterator[tuple[Path, LocalSwarm]]:
    """A tiny model of each family split over three servers (blocks 0:2, 2:4, 4:6): (path, swarm)."""
    path = tiny_models[request.param]
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_servers(path, ["0:2", "2:4", "4:6"], "--num-threads", "1")
        yield path, swarm
    finally:
        swarm.stop()


@contextlib.contextmanager
def local_and_remote(path: Path, *server_flags: str) -> Iterator[tuple[torch.nn.Module, torch.nn.Module]]:
    """(local model, distributed model over two servers, blocks 0:3 and 3:6) of a tiny checkpoint,
    uncompressed wire; every process is reaped on exit."""
    swarm = LocalSwarm()
    remote = None
    try:
        swarm.start_dht()
        swarm.start_servers(path, ["0:3", "3:6"], "--num-threads", "1", *server_flags)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        remote = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, wire_codec="none")
        yield local, remote
    finally:
        if remote is not None:
            remote.swarm_client.shutdown()
        swarm.stop()


def served_counts(remote: torch.nn.Module) -> dict[str, pb.RequestCounts]:
    """Each server's completed requests by kind (sessions, steps, forwards, backwards), from its `info`."""
    client = remote.swarm_client
    peers = {peer for servers in run_sync(client.fetch_blocks()) for peer in servers}
    return {
        peer: run_sync(call_unary(client.p2p, peer, RPC_INFO, pb.InfoRequest(), pb.InfoResponse, 10.0)).served
        for peer in peers
    }
