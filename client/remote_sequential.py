"""The model's decoder layers, served remotely, standing in for transformers' layer list.

`RemoteSequential` takes the place of the whole `model.layers` list: transformers' own model
forward calls it once, like one decoder layer, with the hidden states and the cache object.
Given a `RemoteCache` (an inference session's), it runs one session step; with autograd needed
(inputs or adapter tensors that require grad), it runs the differentiable RemoteBlocks; otherwise
a plain forward. The attention mask and rotary embeddings that transformers computes for it are
not needed: each server builds its own from positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache

from swarm.client.adapters import RequestAdapter
from swarm.client.event_loop import run_sync
from swarm.client.inference_session import InferenceSession
from swarm.client.remote_autograd import remote_blocks
from swarm.client.remote_calls import forward_async
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
        return self.session.position - self.session.prefix_length


class RemoteSequential(nn.Module):
    def __init__(self, client: SwarmClient, adapter: Callable[[], RequestAdapter | None] = lambda: None):
        super().__init__()
        self.client = client
        self.adapter = adapter  # the model's active adapter, looked up at each call

    def forward(self, hidden_states: torch.Tensor, past_key_values: object = None, **_: object) -> torch.Tensor:
        """Hidden states (batch, seq, hidden) through every remote block."""
        if isinstance(past_key_values, RemoteCache):
            return past_key_values.session.step(hidden_states).to(hidden_states.dtype)
        adapter = self.adapter()
        tensors = adapter.tensors() if adapter is not None else []
        if torch.is_grad_enabled() and (hidden_states.requires_grad or any(t.requires_grad for t in tensors)):
            return remote_blocks(self.client, adapter, hidden_states)
        output, _ = run_sync(forward_async(self.client, hidden_states.detach(), 0, self.client.num_blocks, adapter))
        return output.to(hidden_states.dtype)
