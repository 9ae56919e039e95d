"""peft's adapter folders (adapter_config.json + adapter_model.safetensors) to and from wire tensors.

Only LoRA in safetensors: a folder with only `adapter_model.bin` (a pickle) is refused, never
loaded. peft names a matrix `base_model.model.{layer prefix}{block}.{module path}.lora_A.weight`;
on the wire and in manifests it is `{block}.{module path}.lora_A`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from swarm.adapter_manifest import AdapterManifest, build_manifest, split_name
from swarm.errors import ConfigError, InvalidRequest

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PROVENANCE_FILE = "swarm-provenance.txt"  # free-form notes a publish keeps with the version (scripts/finetune.py writes one)
_UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save", "target_parameters")


def read_peft_folder(directory: Path, base: str, layer_key_prefix: str, max_bytes: int) -> tuple[AdapterManifest, dict[str, torch.Tensor]]:
    """The manifest (for base model `base`) and float32 matrices by wire name of a peft LoRA folder; ConfigError names the problem."""
    directory = Path(directory)
    config_file, weights_file = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    if not config_file.is_file():
        raise ConfigError(f"{directory} has no {PEFT_CONFIG} (not a peft adapter folder)")
    if not weights_file.is_file():
        pickle = " (only adapter_model.bin, a pickle, which is never loaded: save with safetensors)" if (directory / "adapter_model.bin").exists() else ""
        raise ConfigError(f"{directory} has no {PEFT_WEIGHTS}{pickle}")
    if weights_file.stat().st_size > max_bytes:
        raise ConfigError(f"{weights_file} is {weights_file.stat().st_size} bytes, over the limit of {max_bytes}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ConfigError(f"{directory} is not a LoRA adapter (peft_type {config.get('peft_type') if isinstance(config, dict) else None!r})")
    for field in _UNSUPPORTED:
        if config.get(field):
            raise ConfigError(f"{directory}: {field}={config[field]!r} is not supported by remote blocks")
    if config.get("bias", "none") != "none":
        raise ConfigError(f"{directory}: LoRA biases are not supported by remote blocks")
    prefix = PEFT_PREFIX + layer_key_prefix
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(weights_file), framework="pt") as handle:
        for key in handle.keys():
            rest = key.removeprefix(prefix)
            if rest == key or not rest.endswith(".weight"):
                raise ConfigError(f"{weights_file}: tensor {key!r} is not a LoRA matrix of a block (expected {prefix}N....lora_A.weight)")
            name = rest.removesuffix(".weight")
            try:
                split_name(name)
            except InvalidRequest as e:
                raise ConfigError(f"{weights_file}: {e}") from None
            tensor = handle.get_tensor(key)
            if tensor.dim() != 2 or not torch.is_floating_point(tensor):
                raise ConfigError(f"{weights_file}: {key!r} is not a floating-point matrix")
            tensors[name] = tensor.to(torch.float32).contiguous()
    if not tensors:
        raise ConfigError(f"{weights_file} holds no LoRA matrices")
    rank: Any = config.get("r")
    alpha: Any = config.get("lora_alpha")
    try:
        manifest = build_manifest(base, rank, alpha, config.get("lora_dropout", 0.0), config.get("use_rslora", False), tensors)
    except (InvalidRequest, TypeError, ValueError) as e:
        raise ConfigError(f"{directory}: {e}") from None
    return manifest, tensors


def write_peft_folder(directory: Path, manifest: AdapterManifest, tensors: dict[str, torch.Tensor], layer_key_prefix: str) -> None:
    """A folder that `peft.PeftModel.from_pretrained(base_model, directory)` loads."""
    from peft import LoraConfig  # only writers need peft's config class

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=manifest.rank, lora_alpha=manifest.alpha,  # type: ignore[arg-type]  # peft takes any number lora_dropout=manifest.dropout, use_rslora=manifest.rslora,
                        target_modules=manifest.target_paths(), task_type="CAUSAL_LM")
    config.save_pretrained(str(directory))
    state = {f"{PEFT_PREFIX}{layer_key_prefix}{name}.weight": tensor.contiguous() for name, tensor in tensors.items()}
    save_file(state, str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})


def read_provenance(directory: Path, max_chars: int) -> str:
    """The folder's provenance notes ("" if it has none), at most `max_chars` characters."""
    path = Path(directory) / PROVENANCE_FILE
    if not path.is_file():
        return ""
    with path.open(encoding="utf-8", errors="replace") as handle:
        return handle.read(max_chars + 1)[:max_chars].strip()
