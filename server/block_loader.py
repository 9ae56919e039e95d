"""Loading only the tensors of a span's blocks from a local safetensors checkpoint, verified against
the model's manifest. The folder may hold only some of the model's files (a server's blocks and the
manifest), sharded or not."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PretrainedConfig

from swarm.checkpoint_format import convert_tensors
from swarm.errors import ConfigError
from swarm.families import ModelFamily
from swarm.manifest import load_manifest, safetensors_header, verify_tensor
from swarm.model_source import cache_root
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
    manifest = load_manifest(checkpoint_dir, cache_root())
    files = _files_by_layer(checkpoint_dir, family, start, end)
    layers = nn.ModuleList()
    for index in range(start, end):
        prefix = f"{family.layer_key_prefix}{index}."
        stored = {}
        for path in files[index]:
            with _opened(path) as reader:
                for key in reader.keys():
                    if key.startswith(prefix):
                        tensor = reader.get_tensor(key)
                        verify_tensor(manifest, key, tensor, path)  # as stored, before any conversion
                        stored[key] = tensor.to(dtype)
        missing = sorted(name for name in manifest.tensors_of(f"block:{index}") if name not in stored)
        if missing:
            raise ConfigError(f"{checkpoint_dir} lacks {', '.join(missing[:3])} of block {index}")
        state = {key.removeprefix(prefix): tensor for key, tensor in convert_tensors(config, stored).items()}
        with torch.device("meta"):
            layer = layer_class(config, layer_idx=index)
        layer.load_state_dict(state, strict=True, assign=True)
        layer = quantize_linear_layers(layer.to(device), quant_type, dtype)
        layers.append(layer.eval().requires_grad_(False))
    logger.info("loaded blocks %d:%d in %s (quantization: %s) in %.1f s", start, end, dtype, quant_type, time.perf_counter() - began)
    return layers


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """safe_open, with a damaged file reported as a ConfigError naming it."""
    try:
        with safe_open(path, framework="pt") as reader:
            yield reader
    except SafetensorError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _files_by_layer(checkpoint_dir: Path, family: ModelFamily, start: int, end: int) -> dict[int, set[Path]]:
    """Which safetensors files hold each layer's tensors (sharded or single-file checkpoints)."""
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weights in {checkpoint_dir}")
    key_files = {}
    for path in files:  # the files present, whatever an index says: a server may hold only its shards
        header, _ = safetensors_header(path)
        key_files.update({key: path for key in header})
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
