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
    def forward(ctx, client: SwarmClient, adapter: RequestAdapter | None, padding_mask: torch.Tensor | None,  # noqa: ANN001
                hidden_states: torch.Tensor, *adapter_tensors: torch.Tensor) -> torch.Tensor:
        seed = random.getrandbits(62)
        batch, seq_len, _ = hidden_states.shape
        parts = run_sync(batch_parts(client, batch, seq_len, spread=True))

        async def run_all() -> list:
            return await asyncio.gather(*(
                forward_async(client, hidden_states.detach()[rows], 0, client.num_blocks, adapter, keep=True, seed=seed + index,
                              padding_mask=padding_mask[rows] if padding_mask is not None else None)
                for index, rows in enumerate(parts)
            ))

        results = run_sync(run_all())
        ctx.client, ctx.adapter, ctx.seed = client, adapter, seed
        ctx.traces = [trace for _, trace in results]
        ctx.sizes = [rows.stop - rows.start for rows in parts]
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
        return (None, None, None, grad_inputs, *adapter_grads)


def remote_blocks(
    client: SwarmClient, adapter: RequestAdapter | None, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Hidden states (batch, seq, hidden) through all remote blocks, differentiably; `padding_mask`
    (batch, seq), True for real tokens, if the batch is padded."""
    tensors = adapter.tensors() if adapter is not None else []
    return RemoteBlocks.apply(client, adapter, padding_mask, hidden_states, *tensors)
