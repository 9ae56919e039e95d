"""The model's decoder layers, served remotely, standing in for transformers' layer list.

`RemoteSequential` takes the place of the whole `model.layers` list: transformers' own model
forward calls it once, like one decoder layer, with the hidden states and the cache object.
Given a `RemoteCache` (an inference session's), it runs one session step; with autograd needed
(inputs or adapter tensors that require grad), it runs the differentiable RemoteBlocks; otherwise
a plain forward. The attention mask and rotary embeddings that transformers computes for it are
not needed: each server builds its own from positions.

The cache is found by its type among the call's arguments, whatever transformers names it
(`past_key_values` in 5.23, `cache` in 5.24). While generate() runs in a session (`generating`),
a call that arrives without the session's cache is an error, never a silent stateless forward:
that is how a transformers release that renames the argument again shows up at once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import transformers
from torch import nn
from transformers import DynamicCache

from swarm.errors import CacheNotPassed, InvalidRequest
from swarm.client.adapters import RequestAdapter
from swarm.client.event_loop import run_sync
from swarm.client.inference_session import InferenceSession
from swarm.client.remote_autograd import remote_blocks
from swarm.client.remote_calls import batch_parts, forward_async
from swarm.client.swarm_client import SwarmClient


class RemoteCache(DynamicCache):
    """A cache whose keys and values live on the servers: locally it only tracks the position.

    `get_seq_length()` is what transformers' generate() reads to know which tokens are new, so a
    session reused across generate() calls sends only the tokens the servers have not seen. It
    counts tokens only, not the trainable prompts that prompt tuning puts before them.
    """

    def __init__(self, session: InferenceSession):
        super().__init__()
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.tokens_seen

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (transformers' sign: a count <= 0), e.g. the draft
        tokens that assisted generation rejected. Only the position moves here; the servers roll their
        caches back when the next step arrives at the lower position (no extra round trip)."""
        held = self.get_seq_length()
        if tokens_to_remove > 0 or -tokens_to_remove > held:
            raise InvalidRequest(f"cannot crop {-tokens_to_remove} tokens from a session holding {held}")
        self.session.position += tokens_to_remove

    @property
    def is_croppable(self) -> bool:
        """Rollback is exact: the servers keep attention keys and values, which they crop."""
        return True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search keeps the best rows: the servers' caches follow (with the next step)."""
        self.session.reorder(beam_idx.cpu().long())

    @property
    def is_linear(self) -> list[bool]:
        """The remote layers hold attention keys and values, none is a linear (SSM) state.

        A local DynamicCache would say so per layer it holds; this one holds none, and `all([])`
        made transformers 5.24's generate() treat it as linear and send the whole prompt again.
        """
        return [False] * self.session.client.num_blocks


# The session whose generate() call is running in this thread or task, if any.
_generating: contextvars.ContextVar[InferenceSession | None] = contextvars.ContextVar("swarm_generating", default=None)


@contextlib.contextmanager
def generating(session: InferenceSession) -> Iterator[None]:
    """Mark a generate() call in `session`: every remote call inside must then carry its cache."""
    token = _generating.set(session)
    try:
        yield
    finally:
        _generating.reset(token)


# The 2D attention mask (batch, past + new tokens) of the model call running in this thread, if it
# has pads: transformers hands the decoder layers only its 4D form, the servers need the 2D one.
_padding_mask: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("swarm_padding_mask", default=None)


@contextlib.contextmanager
def padded(attention_mask: torch.Tensor | None) -> Iterator[None]:
    """Make a model call's 2D attention mask (1 = token, 0 = pad) visible to the remote layers."""
    has_pads = attention_mask is not None and not bool(attention_mask.all())
    token = _padding_mask.set(attention_mask.bool() if has_pads else None)  # type: ignore[union-attr]
    try:
        yield
    finally:
        _padding_mask.reset(token)


def find_remote_cache(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> RemoteCache | None:
    """The RemoteCache among a call's arguments, under whatever name transformers passed it."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, RemoteCache):
            return value
    return None


def require_session_cache(cache: RemoteCache | None) -> None:
    """Raise CacheNotPassed if a generate() in a session is running but `cache` is not its cache."""
    expected = _generating.get()
    if expected is not None and (cache is None or cache.session is not expected):
        raise CacheNotPassed(
            f"generate() called the model without the inference session's cache (transformers "
            f"{transformers.__version__} passed it under a name or in a way Swarm does not know); refusing to "
            "send context-free forwards that would produce wrong tokens. Install the tested versions "
            "(requirements/lock.txt)."
        )


class RemoteSequential(nn.Module):
    def __init__(self, client: SwarmClient, adapter: Callable[[], RequestAdapter | None] = lambda: None):
        super().__init__()
        self.client = client
        self.adapter = adapter  # the model's active adapter, looked up at each call

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Hidden states (batch, seq, hidden) through every remote block."""
        cache = find_remote_cache(args, kwargs)
        require_session_cache(cache)
        padding = _padding_mask.get()  # (batch, past + new), or None
        new_padding = padding[:, -hidden_states.shape[1] :] if padding is not None else None
        if cache is not None:
            return cache.session.step(hidden_states, padding_mask=new_padding).to(hidden_states.dtype)
        adapter = self.adapter()
        tensors = adapter.tensors() if adapter is not None else []
        if torch.is_grad_enabled() and (hidden_states.requires_grad or any(t.requires_grad for t in tensors)):
            return remote_blocks(self.client, adapter, hidden_states, new_padding)
        output = run_sync(self._forward_in_parts(hidden_states.detach(), adapter, new_padding))
        return output.to(hidden_states.dtype)

    async def _forward_in_parts(
        self, hidden_states: torch.Tensor, adapter: RequestAdapter | None, padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """A plain forward, in as many requests as the servers' per-request token limit needs."""
        batch, seq_len, _ = hidden_states.shape
        outputs = []
        for rows in await batch_parts(self.client, batch, seq_len, spread=False):
            mask = padding_mask[rows] if padding_mask is not None else None
            outputs.append((await forward_async(self.client, hidden_states[rows], 0, self.client.num_blocks, adapter,
                                                padding_mask=mask))[0])
        return torch.cat(outputs)
