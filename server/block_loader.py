"""Loading only the tensors of a span's blocks from a local safetensors checkpoint."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig

from swarm.checkpoint_format import convert_tensors
from swarm.errors import ConfigError
from swarm.families import ModelFamily
from swarm.server.quantization import quantize_linear_layers

logger = logging.getLogger(__name__)


def load_span_layers(
    checkpoint_dir: Path,
    config: PretrainedConfig,
    family: ModelFamily,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: torch.device = torch.device("cpu"),
    quant_type: str = "none",
) -> nn.ModuleList:
    """Build decoder layers [start, end) with their absolute indices and load only their weights.

    The checkpoint's tensors are converted as transformers' loading would (swarm.checkpoint_format).
    Layers are built on the meta device and take the checkpoint's tensors with `assign=True`,
    so no memory is spent on a random initialisation that would be overwritten. Each layer is
    moved (and quantized) before the next is read, so peak memory stays near one layer in dtype.
    """
    began = time.perf_counter()
    layer_class = family.layer_class(config)
    files = _files_by_layer(checkpoint_dir, family, start, end)
    layers = nn.ModuleList()
    for index in range(start, end):
        prefix = f"{family.layer_key_prefix}{index}."
        stored = {}
        for path in files[index]:
            with safe_open(path, framework="pt") as reader:
                for key in reader.keys():
                    if key.startswith(prefix):
                        stored[key] = reader.get_tensor(key).to(dtype)
        state = {key.removeprefix(prefix): tensor for key, tensor in convert_tensors(config, stored).items()}
        with torch.device("meta"):
            layer = layer_class(config, layer_idx=index)
        layer.load_state_dict(state, strict=True, assign=True)
        layer = quantize_linear_layers(layer.to(device), quant_type, dtype)
        layers.append(layer.eval().requires_grad_(False))
    logger.info("loaded blocks %d:%d in %s (quantization: %s) in %.1f s", start, end, dtype, quant_type, time.perf_counter() - began)
    return layers


def _files_by_layer(checkpoint_dir: Path, family: ModelFamily, start: int, end: int) -> dict[int, set[Path]]:
    """Which safetensors files hold each layer's tensors (sharded or single-file checkpoints)."""
    index_path = checkpoint_dir / "model.safetensors.index.json"
    if index_path.exists():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        key_files = {key: checkpoint_dir / name for key, name in weight_map.items()}
    else:
        files = sorted(checkpoint_dir.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"no *.safetensors weights in {checkpoint_dir}")
        key_files = {}
        for path in files:
            with safe_open(path, framework="pt") as reader:
                key_files.update({key: path for key in reader.keys()})
    by_layer: dict[int, set[Path]] = defaultdict(set)
    for key, path in key_files.items():
        if key.startswith(family.layer_key_prefix):
            index = int(key.removeprefix(family.layer_key_prefix).split(".", 1)[0])
            if start <= index < end:
                by_layer[index].add(path)
    missing = [index for index in range(start, end) if index not in by_layer]
    if missing:
        raise ConfigError(f"the checkpoint in {checkpoint_dir} has no weights for blocks {missing}")
    return by_layer
