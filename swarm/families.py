"""Model families: what differs between the transformers architectures Swarm serves.

Each family is a thin entry: the decoder-layer and rotary classes are looked up in transformers'
own modeling module (never a copy of it), through the `_no_split_modules` name that every causal-LM
class declares. The distributed model classes and the server's span runner are written once.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from swarm.errors import ConfigError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    model_type: str
    layer_key_prefix: str = "model.layers."  # checkpoint keys of block i start with f"{prefix}{i}."

    def causal_lm_class(self, config: PretrainedConfig) -> type[PreTrainedModel]:
        model_class: type[PreTrainedModel] = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # type: ignore[assignment]
        return model_class

    def layer_class(self, config: PretrainedConfig) -> type[nn.Module]:
        return getattr(self._modeling_module(config), self._layer_class_name(config))

    def rotary_class(self, config: PretrainedConfig) -> type[nn.Module]:
        name = self._layer_class_name(config).removesuffix("DecoderLayer") + "RotaryEmbedding"
        return getattr(self._modeling_module(config), name)

    def attention_kinds(self, config: PretrainedConfig) -> list[str]:
        """The attention kind of every layer: it decides which causal mask the layer needs."""
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return list(layer_types)
        sliding = getattr(config, "sliding_window", None)
        return [SLIDING_ATTENTION if sliding else FULL_ATTENTION] * config.num_hidden_layers

    def _layer_class_name(self, config: PretrainedConfig) -> str:
        names = self.causal_lm_class(config)._no_split_modules
        if not names:
            raise ConfigError(f"{self.causal_lm_class(config).__name__} does not name its decoder layer class")
        return sorted(names)[0] if isinstance(names, set) else names[0]

    def _modeling_module(self, config: PretrainedConfig):  # noqa: ANN202 (a module)
        return importlib.import_module(self.causal_lm_class(config).__module__)


FAMILIES = {name: ModelFamily(name) for name in ("llama", "qwen2", "qwen3", "mistral")}


def family_of(config: PretrainedConfig) -> ModelFamily:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError(f"model type {config.model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    return family


def load_config(checkpoint_dir: Path) -> PretrainedConfig:
    """Read a checkpoint's config with the attention implementation set explicitly.

    `AutoConfig` leaves `_attn_implementation` as None, which makes standalone layers attend
    bidirectionally (notes/transformers-spans.md §7), so it is always set here.
    """
    try:
        return AutoConfig.from_pretrained(checkpoint_dir, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the model config in {checkpoint_dir}: {str(e).splitlines()[0]}") from None
