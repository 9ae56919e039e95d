"""The model's decoder layers, served remotely, standing in for transformers' layer list.

`RemoteSequential` takes the place of the whole `model.layers` list: transformers' own model
forward calls it once, like one decoder layer, with the hidden states and the cache object.
Given a `RemoteCache` (an inference session's), it runs one session step; otherwise it runs a
stateless forward through a route. The attention mask and rotary embeddings that transformers
computes for it are not needed: each server builds its own from positions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from swarm.client.inference_session import InferenceSession
from swarm.client.swarm_client import SwarmClient


class RemoteCache(DynamicCache):
    """A cache whose keys and values live on the servers: locally it only tracks the position.

    `get_seq_length()` is what transformers' generate() reads to know which tokens are new, so a
    session reused across generate() calls sends only the tokens the servers have not seen.
    """

    def __init__(self, session: InferenceSession):
        super().__init__()
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position


class RemoteSequential(nn.Module):
    def __init__(self, client: SwarmClient):
        super().__init__()
        self.client = client

    def forward(self, hidden_states: torch.Tensor, past_key_values: object = None, **_: object) -> torch.Tensor:
        """Hidden states (batch, seq, hidden) through every remote block."""
        if isinstance(past_key_values, RemoteCache):
            output = past_key_values.session.step(hidden_states)
        else:
            output = self.client.forward(hidden_states)
        return output.to(hidden_states.dtype)
