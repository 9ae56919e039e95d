"""Forward passes that backward will need, and backward itself, for a span and a caller's adapter.

A forward that names a `forward_id` keeps its autograd graph in a short-lived, budgeted store
(keyed by caller and id), so the matching backward costs one backward pass instead of a recompute
plus a backward. If the graph is gone (evicted, expired, another server), backward recomputes the
forward from the inputs the request carries, with the same dropout seed: the gradients are the same.
The base weights stay frozen; only inputs and adapter tensors get gradients.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import torch

from swarm.server.adapters import ParsedAdapter, applied
from swarm.server.span_runner import SpanRunner

STORE_TTL = 60.0  # seconds a kept forward waits for its backward
# Activations kept per token per block, in bytes per hidden unit of fp32: residual, norms,
# attention and MLP intermediates (MLP ~2.7x hidden, in and out). Rough, on the safe side.
ACTIVATION_FACTOR = 16


@dataclasses.dataclass
class KeptForward:
    inputs: torch.Tensor  # leaf with requires_grad
    adapter: ParsedAdapter | None
    output: torch.Tensor
    nbytes: int
    expires: float


class ActivationStore:
    """Graphs of recent forwards awaiting their backward, within a byte budget (oldest out first)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[tuple[str, int], KeptForward] = collections.OrderedDict()
        self._bytes = 0

    def put(self, key: tuple[str, int], entry: KeptForward) -> bool:
        self._expire()
        if entry.nbytes > self.max_bytes:
            return False
        while self._bytes + entry.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = entry
        self._bytes += entry.nbytes
        return True

    def pop(self, key: tuple[str, int]) -> KeptForward | None:
        self._expire()
        if key not in self._entries:
            return None
        entry = self._entries[key]
        self._drop(key)
        return entry

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [key for key, entry in self._entries.items() if entry.expires < now]:
            self._drop(key)

    def _drop(self, key: tuple[str, int]) -> None:
        self._bytes -= self._entries.pop(key).nbytes


def forward_for_backward(
    runner: SpanRunner, hidden: torch.Tensor, start: int, end: int, adapter: ParsedAdapter | None, seed: int,
    padding_mask: torch.Tensor | None = None,
) -> KeptForward:
    """Run blocks [start, end) with autograd on, keeping the graph for a later backward."""
    inputs = hidden.detach().requires_grad_(True)
    if adapter is not None:
        adapter.requires_grad_()
    with torch.enable_grad(), applied(runner, adapter, start, training=True, seed=seed):
        output = runner(inputs, start, end, padding_mask=padding_mask)
    nbytes = hidden.numel() * 4 * ACTIVATION_FACTOR * (end - start)
    return KeptForward(inputs, adapter, output, nbytes, time.monotonic() + STORE_TTL)


def backward(kept: KeptForward, grad_outputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Gradients of the inputs, of each LoRA tensor (by wire name) and of the deep prompts."""
    trained = kept.adapter is not None and not kept.adapter.frozen
    tensors = [kept.inputs, *(kept.adapter.tensors() if trained else [])]
    grads = torch.autograd.grad(kept.output, tensors, grad_outputs.to(kept.output.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
    grad_inputs, adapter_grads = grads[0], iter(grads[1:])
    lora_grads: dict[str, torch.Tensor] = {}
    prompt_grads = None
    if trained:
        for block, path in kept.adapter.lora:
            for kind in ("lora_A", "lora_B"):
                lora_grads[kept.adapter.lora_names[(block, path, kind)]] = next(adapter_grads)
        if kept.adapter.deep_prompts is not None:
            prompt_grads = next(adapter_grads)
    return grad_inputs, lora_grads, prompt_grads
