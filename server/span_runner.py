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
from transformers import Cache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from swarm.cache_argument import cache_argument
from swarm.families import SLIDING_ATTENTION, ModelFamily
from swarm.server.attention import use_decode_sdpa
from swarm.server.kv_cache import kv_heads_and_head_dim

_MASK_BUILDERS = {SLIDING_ATTENTION: create_sliding_window_causal_mask}


class SpanRunner(nn.Module):
    """The layers of blocks [start, end) of one model, as one server holds them."""

    def __init__(self, config: PretrainedConfig, family: ModelFamily, start: int, layers: nn.ModuleList):
        super().__init__()
        use_decode_sdpa(config)  # the layers share this config: decode steps attend on one thread (server/attention.py)
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
        self.device = norm_weight.device

    def kv_bytes_per_token(self, start: int, end: int) -> int:
        """Bytes of keys and values that one token of one sequence takes in a session over blocks [start, end)."""
        kv_heads, head_dim = kv_heads_and_head_dim(self.config)
        itemsize = torch.empty((), dtype=self.compute_dtype).element_size()
        return 2 * kv_heads * head_dim * itemsize * (end - start)

    def forward(
        self,
        hidden_states: torch.Tensor,
        start: int,
        end: int,
        position: int = 0,
        cache: Cache | None = None,
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
        position_ids = self.position_ids(position, hidden_states.shape[1], padding_mask, hidden_states.device)
        return self.run(hidden_states, start, end, position_ids, cache, padding_mask)

    @staticmethod
    def position_ids(position: int, new_tokens: int, padding_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Positions (1 or batch, new_tokens) of new tokens at `position`: each row's from its first real token."""
        if padding_mask is None:
            return torch.arange(position, position + new_tokens, device=device)[None]
        return (padding_mask.long().cumsum(-1) - 1).masked_fill(~padding_mask, 0)[:, -new_tokens:]

    def run(
        self,
        hidden_states: torch.Tensor,
        start: int,
        end: int,
        position_ids: torch.Tensor,
        cache: Cache | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Blocks [start, end) on hidden_states (batch, new_tokens, hidden) in the compute dtype, with positions
        given per row (1 or batch, new_tokens) and a 2D mask (batch, cached + new_tokens) or None.

        Merged steps of several sessions come here directly with their rows' own positions and a mask
        that left-pads shorter sessions (server/kv_cache.py MergedCache).
        """
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
                    attention_mask=attention_mask,
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
