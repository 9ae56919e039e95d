"""Attention caches that layers write into in place: one preallocated per session, and a merged
view over several sessions for one batched decode step.

A `SessionCache` holds, for each block of the session's span, keys and values of shape
(batch, kv_heads, max_length, head_dim), allocated when the session opens: exactly the bytes the
session reserved in the server's budget (server/cache_budget.py), so the cache can never outgrow
it. Memory from `torch.empty` is committed by the OS only as positions are written, so a long
`max_length` costs physical memory as the session grows. A step writes its new keys and values
at the session's position and attends to a view of the filled part: nothing is copied per step
(transformers' DynamicCache concatenates, copying the whole cache every step). Rollback is a
length change; beam search reorders the filled rows in place.

A `MergedCache` runs the steps of several sessions as one forward: each session's rows write into
their own `SessionCache`, and attention sees the sessions' keys and values gathered right-aligned
into one (rows, kv_heads, longest, head_dim) tensor, shorter sessions padded on the left and the
pads masked, so the batch looks to transformers' mask builders like an ordinary left-padded batch
(positions come per row from each session's own counter, never from the mask). This gather is the
one copy a merged step makes, as in transformers' own continuous batching (its paged cache reads
by index into one tensor).

Both follow the `Cache` / `CacheLayerMixin` interface of transformers 5.24: layers call
`update(keys, values, layer_idx)`; mask builders call `get_mask_sizes` and `get_query_offset`.
Blocks outside the span are transformers' `DummyLayer`s (layers keep their absolute indices).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer


def kv_heads_and_head_dim(config: PretrainedConfig) -> tuple[int, int]:
    """Key/value heads and head size of every layer: the shape of one token's keys (or values) per block."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_heads, head_dim


class PreallocatedLayer(CacheLayerMixin):
    """One block's keys and values for a session: (batch, kv_heads, max_length, head_dim) each, filled up to `length`."""

    is_sliding = False  # sliding windows are applied by the mask; every position is kept (rollback needs them)
    is_croppable = True

    def __init__(self, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch, kv_heads, max_length, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.device = device
        self.max_length = max_length
        self.length = 0  # positions filled
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers exist from the start (their size is what the session reserved)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (batch, kv_heads, new, head_dim) at `length`; return views of all filled positions."""
        assert self.keys is not None and self.values is not None
        new = key_states.shape[-2]
        end = self.length + new
        if key_states.shape[:2] != self.keys.shape[:2] or key_states.shape[-1] != self.keys.shape[-1] or end > self.max_length:
            raise ValueError(
                f"keys of shape {tuple(key_states.shape)} at position {self.length} do not fit a cache of shape {tuple(self.keys.shape)}"
            )
        self.keys[:, :, self.length : end].copy_(key_states)
        self.values[:, :, self.length : end].copy_(value_states)
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_length

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove positions (transformers' sign convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to drop, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes what row beam_idx[i] held (filled positions only, in place)."""
        assert self.keys is not None and self.values is not None
        rows = beam_idx.to(self.device)
        self.keys[:, :, : self.length] = self.keys[rows, :, : self.length]
        self.values[:, :, : self.length] = self.values[rows, :, : self.length]

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        assert self.keys is not None and self.values is not None
        return self.keys.nbytes + self.values.nbytes


class SessionCache(Cache):
    """A session's cache over blocks [start, end): one PreallocatedLayer per block, at its absolute index."""

    def __init__(
        self, config: PretrainedConfig, start: int, end: int, batch: int, max_length: int, dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        kv_heads, head_dim = kv_heads_and_head_dim(config)
        device = torch.device(device)
        layers: list = [DummyLayer() for _ in range(start)]
        layers += [PreallocatedLayer(batch, kv_heads, max_length, head_dim, dtype, device) for _ in range(start, end)]
        super().__init__(layers=layers)
        self.start, self.end, self.batch, self.max_length = start, end, batch, max_length

    def span_layers(self) -> list[PreallocatedLayer]:
        return self.layers[self.start : self.end]  # type: ignore[return-value]

    def block(self, index: int) -> PreallocatedLayer:
        """The cache of block `index` (absolute), which must be in the span."""
        return self.span_layers()[index - self.start]

    @property
    def length(self) -> int:
        """Positions held (the same in every block once a step is complete)."""
        return self.span_layers()[0].length

    def truncate(self, position: int) -> None:
        """Keep only positions below `position` in every block: makes a step repeatable after a failed attempt."""
        if position > self.length:
            raise ValueError(f"a step at position {position} would leave a gap: the cache holds {self.length} positions")
        for layer in self.span_layers():
            layer.length = min(layer.length, position)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.span_layers())


@dataclasses.dataclass
class Member:
    """One session's part of a merged step: its cache and the position its new tokens start at."""

    cache: SessionCache
    position: int
    rows: int  # the session's batch


class MergedLayer(CacheLayerMixin):
    """Block `index` of a merged step: splits the rows among the sessions, gathers their keys right-aligned."""

    is_sliding = False
    is_croppable = False

    def __init__(self, members: list[Member], index: int, new_tokens: int):
        super().__init__()
        self.members = members
        self.index = index
        self.new_tokens = new_tokens
        self.total = max(member.position for member in members) + new_tokens  # longest session after this step
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the sessions' own caches hold the data."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values (all rows, kv_heads, new, head_dim) -> gathered (all rows, kv_heads, total, head_dim), pads zero."""
        batch, kv_heads, _, head_dim = key_states.shape
        # Zeros, not empty: masked positions get no weight, but 0 x NaN garbage would still be NaN.
        keys = key_states.new_zeros((batch, kv_heads, self.total, head_dim))
        values = value_states.new_zeros((batch, kv_heads, self.total, head_dim))
        row = 0
        for member in self.members:
            rows = slice(row, row + member.rows)
            own_keys, own_values = member.cache.block(self.index).update(key_states[rows], value_states[rows])
            length = own_keys.shape[-2]
            keys[rows, :, self.total - length :] = own_keys
            values[rows, :, self.total - length :] = own_values
            row += member.rows
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.total, 0

    def get_seq_length(self) -> int:
        return self.total - self.new_tokens

    def get_max_length(self) -> int:
        return -1


class MergedCache(Cache):
    """The cache of one merged forward over several sessions of the same span (see the module docstring)."""

    def __init__(self, members: list[Member], start: int, end: int, new_tokens: int):
        layers: list = [DummyLayer() for _ in range(start)]
        layers += [MergedLayer(members, index, new_tokens) for index in range(start, end)]
        super().__init__(layers=layers)
        self.members = members
        self.new_tokens = new_tokens
        self.total = max(member.position for member in members) + new_tokens

    def padding_mask(self, own_masks: list[torch.Tensor | None]) -> torch.Tensor | None:
        """(all rows, total) True for real tokens: each session's own mask (None: all real), left-padded to `total`.
        None if no row has a pad at all."""
        if all(mask is None for mask in own_masks) and all(m.position == self.members[0].position for m in self.members):
            return None
        parts = []
        for member, mask in zip(self.members, own_masks):
            own = mask if mask is not None else torch.ones(member.rows, member.position + self.new_tokens, dtype=torch.bool)
            pad = torch.zeros(member.rows, self.total - own.shape[1], dtype=torch.bool)
            parts.append(torch.cat([pad, own.to(torch.bool)], dim=1))
        return torch.cat(parts, dim=0)
