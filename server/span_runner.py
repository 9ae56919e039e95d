"""Running a contiguous range of decoder layers on hidden states, with or without a KV cache.

Follows the recipe verified in notes/transformers-spans.md: layers keep their absolute indices,
rotary embeddings come from the config (one table per attention kind where the family has two, as
Gemma 3 does), positions come from the session's own counter (never from `cache.get_seq_length()`),
and each attention kind's mask is built with `layer_idx` set to the first layer of that kind in
the span, so a span cache that starts at block k>0 is masked right.
The cache goes to layers and mask builders under the name their signatures give (swarm.cache_argument).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from swarm.cache_argument import cache_argument
from swarm.families import SLIDING_ATTENTION, ModelFamily

_MASK_BUILDERS = {SLIDING_ATTENTION: create_sliding_window_causal_mask}


class SpanRunner(nn.Module):
    """The layers of blocks [start, end) of one model, as one server holds them."""

    def __init__(self, config: PretrainedConfig, family: ModelFamily, start: int, layers: nn.ModuleList):
        super().__init__()
        self.config = config
        self.start = start
        self.end = start + len(layers)
        self.layers = layers
        self.rotary = family.rotary_class(config)(config=config)
        self.rotary_per_attention_kind = family.rotary_per_attention_kind
        self.attention_kinds = family.attention_kinds(config)
        self.layer_cache_argument = cache_argument(type(layers[0]).forward)
        norm_weight: torch.Tensor = layers[0].input_layernorm.weight  # type: ignore[union-attr, assignment]
        self.compute_dtype = norm_weight.dtype  # of hidden states and the KV cache (weights may be quantized)

    def kv_bytes_per_token(self, start: int, end: int) -> int:
        """Bytes of keys and values that one token of one sequence takes in a session over blocks [start, end)."""
        config = self.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        itemsize = torch.empty((), dtype=self.compute_dtype).element_size()
        return 2 * kv_heads * head_dim * itemsize * (end - start)

    def forward(
        self,
        hidden_states: torch.Tensor,
        start: int,
        end: int,
        position: int = 0,
        cache: DynamicCache | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run blocks [start, end) on hidden_states (batch, new_tokens, hidden) at `position`.

        With a cache, the tokens are appended to it at `position` (the caller rolls it back first
        if needed); without one, `position` must be 0 and the sequence is processed whole.
        `padding_mask` (batch, position + new_tokens), True for real tokens, masks pads as keys and
        numbers each row's positions from its first real token, as transformers does for a padded
        batch (notes/transformers-spans.md §5); None means no padding.
        Autograd follows the caller's mode: handlers run inference under torch.inference_mode().
        """
        hidden_states = hidden_states.to(self.compute_dtype)
        seq_len = hidden_states.shape[1]
        if padding_mask is None:
            position_ids = torch.arange(position, position + seq_len, device=hidden_states.device)[None]
        else:
            position_ids = (padding_mask.long().cumsum(-1) - 1).masked_fill(~padding_mask, 0)[:, -seq_len:]
        # (cos, sin), each (1 or batch, new_tokens, rotary_dim): one table for all layers, or one per attention kind
        shared = None if self.rotary_per_attention_kind else self.rotary(hidden_states, position_ids)
        masks, rotary = {}, {}  # by attention kind
        for index in range(start, end):
            kind = self.attention_kinds[index]
            if kind not in masks:
                rotary[kind] = shared if shared is not None else self.rotary(hidden_states, position_ids, kind)
                build = _MASK_BUILDERS.get(kind, create_causal_mask)
                masks[kind] = build(
                    config=self.config,
                    inputs_embeds=hidden_states,
                    attention_mask=padding_mask,
                    position_ids=position_ids,
                    layer_idx=index,
                    **{cache_argument(build): cache},
                )
        for index in range(start, end):
            hidden_states = self.layers[index - self.start](
                hidden_states,
                attention_mask=masks[self.attention_kinds[index]],
                position_embeddings=rotary[self.attention_kinds[index]],
                **{self.layer_cache_argument: cache},
            )
        return hidden_states
