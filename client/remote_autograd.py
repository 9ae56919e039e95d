"""The remote blocks as one autograd Function, so that loss.backward() works as on a local model.

forward sends the hidden states through the swarm with the servers keeping activations; backward
walks the same hops in reverse and returns the gradients of the hidden states and of every adapter
tensor (LoRA weights, deep prompts), which the client's optimizer then updates.
"""

from __future__ import annotations

import random

import torch

from swarm.client.adapters import RequestAdapter
from swarm.client.event_loop import run_sync
from swarm.client.remote_calls import backward_async, forward_async
from swarm.client.swarm_client import SwarmClient


class RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, client: SwarmClient, adapter: RequestAdapter | None, hidden_states: torch.Tensor, *adapter_tensors: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        seed = random.getrandbits(62)
        output, trace = run_sync(forward_async(client, hidden_states.detach(), 0, client.num_blocks, adapter, keep=True, seed=seed))
        ctx.client, ctx.adapter, ctx.trace, ctx.seed = client, adapter, trace, seed
        ctx.input_dtype = hidden_states.dtype
        return output.to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: ANN001, ANN205
        grads = run_sync(backward_async(ctx.client, ctx.trace, grad_output.float(), ctx.adapter, ctx.seed))
        adapter_grads = ctx.adapter.gradients(grads) if ctx.adapter is not None else []
        return (None, None, grads.inputs.to(ctx.input_dtype), *adapter_grads)


def remote_blocks(client: SwarmClient, adapter: RequestAdapter | None, hidden_states: torch.Tensor) -> torch.Tensor:
    """Hidden states (batch, seq, hidden) through all remote blocks, differentiably."""
    tensors = adapter.tensors() if adapter is not None else []
    return RemoteBlocks.apply(client, adapter, hidden_states, *tensors)
