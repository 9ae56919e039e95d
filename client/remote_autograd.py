"""The remote blocks as one autograd Function, so that loss.backward() works as on a local model.

forward sends the hidden states through the swarm with the servers keeping activations; backward
walks the same hops in reverse and returns the gradients of the hidden states and of every adapter
tensor (LoRA weights, deep prompts), which the client's optimizer then updates. Where the swarm
holds every block more than once, the batch is split into that many parts that travel in
parallel, each on a route drawn by throughput and load; their adapter gradients are summed. A batch
larger than the servers' per-request token limit is split into parts that fit it.
"""

from __future__ import annotations

import asyncio
import random

import torch

from swarm.client.adapters import RequestAdapter
from swarm.client.event_loop import run_sync
from swarm.client.remote_calls import backward_async, batch_parts, forward_async
from swarm.client.swarm_client import SwarmClient


class RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, client: SwarmClient, adapter: RequestAdapter | None, hidden_states: torch.Tensor, *adapter_tensors: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        seed = random.getrandbits(62)
        chunks = run_sync(batch_parts(client, hidden_states.detach(), spread=True))

        async def run_all() -> list:
            return await asyncio.gather(*(
                forward_async(client, chunk, 0, client.num_blocks, adapter, keep=True, seed=seed + index)
                for index, chunk in enumerate(chunks)
            ))

        results = run_sync(run_all())
        ctx.client, ctx.adapter, ctx.seed = client, adapter, seed
        ctx.traces = [trace for _, trace in results]
        ctx.sizes = [chunk.shape[0] for chunk in chunks]
        ctx.input_dtype = hidden_states.dtype
        return torch.cat([output for output, _ in results]).to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: ANN001, ANN205
        grad_chunks = grad_output.float().split(ctx.sizes)

        async def run_all() -> list:
            return await asyncio.gather(*(
                backward_async(ctx.client, trace, grad, ctx.adapter, ctx.seed + index)
                for index, (trace, grad) in enumerate(zip(ctx.traces, grad_chunks))
            ))

        results = run_sync(run_all())
        grad_inputs = torch.cat([grads.inputs for grads in results]).to(ctx.input_dtype)
        adapter_grads: list[torch.Tensor | None] = []
        if ctx.adapter is not None:
            per_part = [ctx.adapter.gradients(grads) for grads in results]
            for found in zip(*per_part):
                present = [grad for grad in found if grad is not None]
                adapter_grads.append(torch.stack(present).sum(0) if present else None)
        return (None, None, grad_inputs, *adapter_grads)


def remote_blocks(client: SwarmClient, adapter: RequestAdapter | None, hidden_states: torch.Tensor) -> torch.Tensor:
    """Hidden states (batch, seq, hidden) through all remote blocks, differentiably."""
    tensors = adapter.tensors() if adapter is not None else []
    return RemoteBlocks.apply(client, adapter, hidden_states, *tensors)
