"""Client-owned adapters for the remote blocks: LoRA (peft's config and file format) and prompts.

The weights are ordinary trainable parameters on the client, so any torch optimizer works; each
request carries the ones for its blocks (swarm.rpc.Adapter), and the servers return their
gradients. Which modules get LoRA is decided by peft itself (`check_target_module_exists`) on
the module names a local peft model would have; the files are peft's (adapter_config.json,
adapter_model.safetensors with peft's tensor names), so an adapter trained here loads into a
plain local peft model, and one trained with peft loads here.

`HeldLora` is the other kind: an adapter the servers hold (published by name, see
adapter_registry.py), of which the client keeps only the hash that its requests name.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from swarm.errors import ConfigError
from swarm.families import ModelFamily
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import encode
from swarm.client.remote_calls import Gradients

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft puts before the transformers module names


class RemoteLora(nn.Module):
    """One LoRA adapter for every remote block: A (rank, in) and B (out, rank) per targeted linear layer."""

    def __init__(self, peft_config: LoraConfig, model_config: PretrainedConfig, family: ModelFamily):
        super().__init__()
        if not isinstance(peft_config, LoraConfig):
            raise ConfigError(f"only LoRA adapters are supported, got {type(peft_config).__name__}")
        if peft_config.use_dora or peft_config.bias != "none":
            raise ConfigError("DoRA and LoRA biases are not supported by remote blocks")
        self.peft_config = peft_config
        self.rank = peft_config.r
        self.targets: list[tuple[int, str]] = []  # (global block, module path inside the block)
        self.weights = nn.ParameterDict()
        with torch.device("meta"):
            layer = family.layer_class(model_config)(model_config, layer_idx=0)
        linears = {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
        matching = _matching_config(peft_config, model_config, layer, linears, family.layer_key_prefix)
        for block in range(model_config.num_hidden_layers):
            for path, linear in linears.items():
                if not check_target_module_exists(matching, f"{family.layer_key_prefix}{block}.{path}"):
                    continue
                self.targets.append((block, path))
                lora_a = torch.empty(self.rank, linear.in_features)
                lora_b = torch.empty(linear.out_features, self.rank)
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # peft's init: A like nn.Linear, B zero
                if peft_config.init_lora_weights is False:
                    nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
                elif peft_config.init_lora_weights is True:
                    nn.init.zeros_(lora_b)
                else:
                    raise ConfigError(f"init_lora_weights={peft_config.init_lora_weights!r} is not supported (use True or False)")
                self.weights[_key(block, path, "lora_A")] = nn.Parameter(lora_a)
                self.weights[_key(block, path, "lora_B")] = nn.Parameter(lora_b)
        if not self.targets:
            raise ConfigError(f"target_modules {peft_config.target_modules!r} match no linear layer of the remote blocks")
        self.layer_key_prefix = family.layer_key_prefix
        self.parents: tuple[str, ...] = ()  # hashes of the published adapters this one started from (lineage)

    held_hash = ""  # not an adapter held by servers: its weights travel with each request

    def wire_tensors(self) -> dict[str, torch.Tensor]:
        """The matrices by wire name, float32 (what a manifest hashes and a publish places on servers)."""
        return {name: tensor.detach().float().clone() for name, tensor in zip(self.names(), self.tensors())}

    def load_wire_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        prefix = f"{PEFT_PREFIX}{self.layer_key_prefix}"
        self.load_peft_state_dict({f"{prefix}{name}.weight": tensor for name, tensor in tensors.items()}, source)

    def names(self) -> list[str]:
        """Wire names, in the order of `tensors()`."""
        return [f"{block}.{path}.{kind}" for block, path in self.targets for kind in ("lora_A", "lora_B")]

    def tensors(self) -> list[nn.Parameter]:
        return [self.weights[_key(block, path, kind)] for block, path in self.targets for kind in ("lora_A", "lora_B")]

    def fill(self, message: pb.Adapter, start: int, end: int) -> None:
        config = self.peft_config
        message.lora_rank, message.lora_alpha = self.rank, config.lora_alpha
        message.lora_dropout, message.use_rslora = config.lora_dropout, bool(config.use_rslora)
        for block, path in self.targets:
            if start <= block < end:
                for kind in ("lora_A", "lora_B"):
                    tensor = self.weights[_key(block, path, kind)].detach()
                    message.lora.add(name=f"{block}.{path}.{kind}", tensor=encode(tensor, "none"))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the names peft saves them with."""
        return {
            f"{PEFT_PREFIX}{self.layer_key_prefix}{block}.{path}.{kind}.weight": self.weights[_key(block, path, kind)].detach().clone()
            for block, path in self.targets
            for kind in ("lora_A", "lora_B")
        }

    def load_peft_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        expected = self.peft_state_dict()
        missing, unexpected = set(expected) - set(state), set(state) - set(expected)
        if missing or unexpected:
            raise ConfigError(f"{source} does not fit this model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        with torch.no_grad():
            for block, path in self.targets:
                for kind in ("lora_A", "lora_B"):
                    name = f"{PEFT_PREFIX}{self.layer_key_prefix}{block}.{path}.{kind}.weight"
                    target = self.weights[_key(block, path, kind)]
                    if state[name].shape != target.shape:
                        raise ConfigError(f"{source}: {name} has shape {tuple(state[name].shape)}, expected {tuple(target.shape)}")
                    target.copy_(state[name])

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.peft_config.save_pretrained(str(directory))
        save_file(self.peft_state_dict(), str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})

    @classmethod
    def load(cls, directory: Path, model_config: PretrainedConfig, family: ModelFamily) -> RemoteLora:
        if not (directory / PEFT_WEIGHTS).is_file():
            raise ConfigError(f"{directory} has no {PEFT_WEIGHTS}")
        lora = cls(LoraConfig.from_pretrained(str(directory)), model_config, family)
        lora.load_peft_state_dict(load_file(str(directory / PEFT_WEIGHTS)), str(directory))
        return lora


def _matching_config(peft_config: LoraConfig, model_config: PretrainedConfig, layer: nn.Module,
                     linears: dict[str, nn.Module], prefix: str) -> LoraConfig:
    """The config whose targets are matched against a block's linear layers (`linears`, by path in `layer`).

    ConfigError if peft would adapt anything else here, which remote blocks cannot: weights held
    outside linear layers, such as a mixture of experts' stacked matrices and router. peft itself
    says which (it rewrites the targets of such models for transformers 5's layouts), asked about
    one block under its checkpoint prefix.
    """
    view = nn.Module()  # one block at `prefix`0, with the config peft reads the model type from
    parent = view
    *outer, last = prefix.rstrip(".").split(".")
    for name in outer:
        parent.add_module(name, nn.Module())
        parent = parent.get_submodule(name)
    parent.add_module(last, nn.ModuleList([layer]))
    view.config = model_config
    probe = copy.deepcopy(peft_config)
    try:
        convert_peft_config_for_transformers(probe, model=view, conversions=None)
    except ValueError as e:  # e.g. one of two projections that transformers 5 fuses into one expert weight
        raise ConfigError(f"target_modules {peft_config.target_modules!r}: {e}") from None
    if probe.target_parameters:
        raise ConfigError(f"peft would adapt {', '.join(sorted(probe.target_parameters))} here, weights outside linear "
                          "layers (a mixture of experts' stacked matrices or router), which remote blocks cannot adapt; "
                          f"target their linear layers: {', '.join(sorted(linears))}")
    targets = peft_config.target_modules
    if isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        # peft's "all-linear": every linear layer but the LM head, so every one in the blocks, whatever the
        # family calls them (Phi-3 fuses qkv_proj and gate_up_proj)
        matching = copy.copy(peft_config)
        matching.target_modules = set(linears)
        return matching
    not_linear = [name for name, module in layer.named_modules()
                  if name and name not in linears and check_target_module_exists(peft_config, f"{prefix}0.{name}")]
    if not_linear:
        raise ConfigError(f"target_modules {targets!r} name modules that are not linear layers ({', '.join(not_linear)}), "
                          f"which remote blocks cannot adapt; their linear layers: {', '.join(sorted(linears))}")
    return peft_config


def _key(block: int, path: str, kind: str) -> str:
    """A ParameterDict key (no dots allowed) for one LoRA matrix."""
    return f"{block}__{path.replace('.', '__')}__{kind}"


class HeldLora(nn.Module):
    """A LoRA held by the servers, named by its hash: requests carry the hash, never weights."""

    def __init__(self, spec: str, digest: str):
        super().__init__()
        self.spec = spec  # as the user named it, e.g. "swarm:support-bot@2"
        self.held_hash = digest

    def names(self) -> list[str]:
        return []

    def tensors(self) -> list[nn.Parameter]:
        return []

    def fill(self, message: pb.Adapter, start: int, end: int) -> None:
        message.adapter_hash = self.held_hash

    def save(self, directory: Path) -> None:
        raise ConfigError(f"adapter {self.spec} is served by the swarm and has no weights here: "
                          f"`swarm-adapter pull` it, or load it with is_trainable=True")


class RequestAdapter:
    """What the model's active tuning adds to requests: LoRA and/or deep prompts (blocks, length, hidden)."""

    def __init__(self, lora: RemoteLora | HeldLora | None, deep_prompts: nn.Parameter | None):
        if isinstance(lora, HeldLora) and deep_prompts is not None:
            raise ConfigError("an adapter held by the servers cannot be combined with deep prompt tuning")
        self.lora = lora
        self.deep_prompts = deep_prompts

    @property
    def held_hash(self) -> str:
        """The hash of the adapter held by servers that requests name, or "" (routing prefers its holders)."""
        return self.lora.held_hash if self.lora is not None else ""

    def tensors(self) -> list[torch.Tensor]:
        found: list[torch.Tensor] = list(self.lora.tensors()) if self.lora is not None else []
        return found + ([self.deep_prompts] if self.deep_prompts is not None else [])

    def message(self, start: int, end: int) -> pb.Adapter:
        message = pb.Adapter()
        if self.lora is not None:
            self.lora.fill(message, start, end)
        if self.deep_prompts is not None:
            message.deep_prompts.CopyFrom(encode(self.deep_prompts[start:end].detach(), "none"))
        return message

    def gradients(self, grads: Gradients) -> list[torch.Tensor | None]:
        """Gradients aligned with `tensors()` (None where no server returned one)."""
        found: list[torch.Tensor | None] = []
        if self.lora is not None:
            found += [grads.lora.get(name) for name in self.lora.names()]
        if self.deep_prompts is not None:
            full = torch.zeros_like(self.deep_prompts)
            for start, grad in grads.deep_prompts.items():
                full[start : start + grad.shape[0]] = grad
            found.append(full)
        return found
