"""Model families: what differs between the transformers architectures Swarm serves.

Each family is one line of data in FAMILIES: the decoder-layer and rotary classes are looked up in
transformers' own modeling module (never a copy of it), through the `_no_split_modules` name that
every causal-LM class declares, and a family declares only what differs from the defaults. The
distributed model classes and the server's span runner are written once.

A model type that is not in the table is refused with what stands in the way: a missing class or
argument, an attention kind the span runner has no mask for, or, if its classes look standard,
only the missing line in FAMILIES (and a tiny test config), since parity is tested per family.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from types import ModuleType

from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from swarm.errors import ConfigError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
ATTENTION_KINDS = (FULL_ATTENTION, SLIDING_ATTENTION)  # the kinds the span runner builds masks for


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One transformers architecture: only what differs from the defaults, as data."""

    model_type: str
    layer_key_prefix: str = "model.layers."  # checkpoint keys of block i start with f"{prefix}{i}."
    # The rotary embedding keeps one table per attention kind and takes the kind as a third argument
    # (Gemma 3: local layers use a smaller rope base than global ones).
    rotary_per_attention_kind: bool = False
    # How mixture-of-experts layers run, set on the config as transformers' model constructor would
    # (standalone layers otherwise fall back to another kernel, with a warning): None for dense models.
    experts_implementation: str | None = None
    # Config flags that must be off: what they change happens outside the decoder layers' outputs
    # (router logits for an auxiliary loss) or breaks the causal attention the servers build.
    refused_flags: tuple[str, ...] = ()

    def causal_lm_class(self, config: PretrainedConfig) -> type[PreTrainedModel]:
        model_class: type[PreTrainedModel] = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # type: ignore[assignment]
        return model_class

    def layer_class(self, config: PretrainedConfig) -> type[nn.Module]:
        return getattr(self._modeling_module(config), self._layer_class_name(config))

    def rotary_class(self, config: PretrainedConfig) -> type[nn.Module]:
        return getattr(self._modeling_module(config), self._rotary_class_name(config))

    def attention_kinds(self, config: PretrainedConfig) -> list[str]:
        """The attention kind of every layer: it decides which causal mask the layer needs."""
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return list(layer_types)
        sliding = getattr(config, "sliding_window", None)
        return [SLIDING_ATTENTION if sliding else FULL_ATTENTION] * config.num_hidden_layers

    def prepare(self, config: PretrainedConfig) -> PretrainedConfig:
        """Set what transformers' model constructor would set on `config` before layers are built alone."""
        if self.experts_implementation is not None:
            config._experts_implementation = self.experts_implementation
        return config

    def problems(self, config: PretrainedConfig) -> list[str]:
        """What this transformers architecture lacks for Swarm to run its layers in spans (empty: nothing)."""
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            return ["transformers has no causal-LM class for it"]
        if not hasattr(config, "num_hidden_layers"):  # e.g. Gemma 3's image-text model: its text model is gemma3_text
            return ["missing a num_hidden_layers in its config (a composite model: serve its text model)"]
        model_class = self.causal_lm_class(config)
        module = self._modeling_module(config)
        if not model_class._no_split_modules:
            return [f"{model_class.__name__} names no decoder-layer class (_no_split_modules)"]
        layer_name, rotary_name = self._layer_class_name(config), self._rotary_class_name(config)
        found: list[str] = []
        if not hasattr(module, layer_name):
            found.append(f"decoder-layer class {layer_name} in {module.__name__}")
        else:
            arguments = inspect.signature(getattr(module, layer_name).forward).parameters
            found += [f"argument {name!r} of {layer_name}.forward" for name in ("position_embeddings", "attention_mask")
                      if name not in arguments]
        if not hasattr(module, rotary_name):
            found.append(f"rotary-embedding class {rotary_name} in {module.__name__}")
        else:
            per_kind = "layer_type" in inspect.signature(getattr(module, rotary_name).forward).parameters
            if per_kind != self.rotary_per_attention_kind:
                found.append(f"rotary_per_attention_kind={per_kind} in its family entry "
                             f"({rotary_name}.forward {'takes' if per_kind else 'lacks'} a layer_type)")
        unknown = sorted(set(self.attention_kinds(config)) - set(ATTENTION_KINDS))
        if unknown:
            found.append(f"a causal mask for layer types {unknown} (the span runner builds {list(ATTENTION_KINDS)})")
        return [f"missing {what}" for what in found] + [
            f"config flag {flag}=True is not supported" for flag in self.refused_flags if getattr(config, flag, False)
        ]

    def _layer_class_name(self, config: PretrainedConfig) -> str:
        names = self.causal_lm_class(config)._no_split_modules
        if not names:
            raise ConfigError(f"{self.causal_lm_class(config).__name__} does not name its decoder layer class")
        return sorted(names)[0] if isinstance(names, set) else names[0]

    def _rotary_class_name(self, config: PretrainedConfig) -> str:
        return self._layer_class_name(config).removesuffix("DecoderLayer") + "RotaryEmbedding"

    def _modeling_module(self, config: PretrainedConfig) -> ModuleType:
        return importlib.import_module(self.causal_lm_class(config).__module__)


# Tested families (tests/conftest.py TINY_CONFIGS has a tiny model of each); each entry says only what differs.
FAMILIES = {
    family.model_type: family
    for family in (
        ModelFamily("llama"),
        ModelFamily("mistral"),  # one sliding window for every layer
        ModelFamily("qwen2"),
        ModelFamily("qwen3"),
        ModelFamily("phi3"),  # fused qkv_proj and gate_up_proj: LoRA targets those names
        ModelFamily("gemma3_text", rotary_per_attention_kind=True, refused_flags=("use_bidirectional_attention",)),
        ModelFamily("mixtral", experts_implementation="grouped_mm", refused_flags=("output_router_logits",)),
    )
}


def family_of(config: PretrainedConfig) -> ModelFamily:
    """The family entry of `config`'s model type; ConfigError naming what is missing if there is none that works."""
    model_type = config.model_type
    family = FAMILIES.get(model_type)
    problems = (family or ModelFamily(model_type)).problems(config)
    if family is not None and not problems:
        return family
    if family is None and not problems:
        problems = ["missing its line in swarm.families.FAMILIES (its transformers classes look standard: add the line, "
                    "and a tiny model to TINY_CONFIGS in tests/conftest.py so that the parity suite covers it)"]
    raise ConfigError(f"model type {model_type!r} is not supported: {'; '.join(problems)} "
                      f"(supported: {', '.join(FAMILIES)})")


def load_config(checkpoint_dir: Path) -> PretrainedConfig:
    """Read a checkpoint's config with the attention implementation set explicitly.

    `AutoConfig` leaves `_attn_implementation` as None, which makes standalone layers attend
    bidirectionally (notes/transformers-spans.md §7), so it is always set here, and so is what
    the family's entry says a model constructor would set.
    """
    try:
        config = AutoConfig.from_pretrained(checkpoint_dir, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the model config in {checkpoint_dir}: {str(e).splitlines()[0]}") from None
    family = FAMILIES.get(config.model_type)
    return family.prepare(config) if family is not None else config
