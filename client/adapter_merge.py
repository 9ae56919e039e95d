"""Merging published adapters with peft's own `add_weighted_adapter`, and publishing the result.

The client holds no blocks, so the merge runs on a weightless stand-in of the model: the family's
transformers class built from the config on the meta device, each parameter then replaced by one
float repeated to its shape (a stride-0 view: no memory). peft only reads the base layers' shapes
and dtypes to attach LoRA modules, and merging touches only the LoRA matrices, so the merged
adapter is exactly what peft computes on the real model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from swarm.adapter_files import read_peft_folder, write_peft_folder
from swarm.adapter_records import AdapterVersion
from swarm.errors import ConfigError
from swarm.records import RecordSigner
from swarm.client.adapter_registry import MAX_PULL_BYTES, AdapterRegistry, Publication

METHODS = ("ties", "dare_ties", "dare_linear", "linear", "svd", "cat")
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear")


def weightless_model(model_config: PretrainedConfig) -> nn.Module:
    """The model's module tree with every parameter a stride-0 view of one zero (shapes and dtypes only)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            module._parameters[name] = nn.Parameter(torch.zeros(1).expand(parameter.shape), requires_grad=False)
    return model


def merge_folders(folders: list[Path], weights: list[float], method: str, density: float | None,
                  model_config: PretrainedConfig, out: Path) -> None:
    """peft's add_weighted_adapter over local adapter folders, saved as one peft folder at `out`."""
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if len(folders) < 2 or len(weights) != len(folders):
        raise ConfigError(f"merging needs at least two adapters and one weight per adapter (got {len(folders)} and {len(weights)})")
    if method in DENSITY_METHODS and (density is None or not 0 < density <= 1):
        raise ConfigError(f"--method {method} needs --density in (0, 1]")
    peft_model = PeftModel.from_pretrained(weightless_model(model_config), str(folders[0]), adapter_name="a0")
    for index, folder in enumerate(folders[1:], start=1):
        peft_model.load_adapter(str(folder), adapter_name=f"a{index}")
    names = [f"a{index}" for index in range(len(folders))]
    options = {"density": density} if method in DENSITY_METHODS else {}
    try:
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=method, **options)
    except ValueError as e:  # peft's own refusals, e.g. different ranks for "linear"
        raise ConfigError(f"peft cannot merge these adapters with {method}: {e}") from None
    peft_model.save_pretrained(str(out), selected_adapters=["merged"])


def merge_published(registry: AdapterRegistry, specs: list[str], weights: list[float], method: str, density: float | None,
                    name: str, signer: RecordSigner, model_config: PretrainedConfig, layer_key_prefix: str,
                    provenance: str = "") -> Publication:
    """Pull the adapters, merge them with peft, and publish the result under `name` with them as parents."""
    versions: list[AdapterVersion] = [registry.resolve(spec)[1] for spec in specs]
    with tempfile.TemporaryDirectory(prefix="swarm-merge-") as scratch:
        folders = []
        for index, version in enumerate(versions):
            manifest, tensors = registry.pull(version.hash)
            folders.append(Path(scratch, f"a{index}"))
            write_peft_folder(folders[-1], manifest, tensors, layer_key_prefix)
        merge_folders(folders, weights, method, density, model_config, Path(scratch, "out"))
        merged, tensors = read_peft_folder(Path(scratch, "out", "merged"), registry.base, layer_key_prefix, MAX_PULL_BYTES)
    how = f"merge {method} weights={','.join(f'{w:g}' for w in weights)}" + (f" density={density:g}" if method in DENSITY_METHODS else "")
    return registry.publish(merged, tensors, name, signer, parents=tuple(v.hash for v in versions), method=how,
                            provenance=provenance or f"merged from {', '.join(specs)}")
