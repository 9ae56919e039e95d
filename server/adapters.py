"""A caller's adapter (LoRA weights, deep prompts) checked and applied to this server's blocks.

A caller's own adapter arrives with each request (or once per inference session); one that the
server holds (adapter_store.py) is named by hash and applied the same way, frozen. Both are
checked against the blocks they name and applied only while that request computes, through
forward hooks (the compute worker runs one request at a time, so no request ever sees another's
adapter). The LoRA update is peft's: base(x) + lora_B(lora_A(dropout(x))) * alpha / rank (or
alpha / sqrt(rank) with rsLoRA), so gradients equal those of a local peft model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from swarm.errors import InvalidRequest
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import decode
from swarm.server.span_runner import SpanRunner

MAX_PROMPT_LENGTH = 256  # deep prompt tokens per block


class AdapterHooks(Protocol):
    """Hooks that route among several held adapters (server/adapter_routing.py) instead of adding one."""

    def install(self, runner: SpanRunner) -> list[RemovableHandle]: ...


@dataclasses.dataclass
class ParsedAdapter:
    """LoRA pairs by (global block, module path), and deep prompts (span blocks, prompt length, hidden)."""

    scaling: float
    dropout: float
    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # A: (rank, in), B: (out, rank)
    lora_names: dict[tuple[int, str, str], str]  # (block, path, "lora_A"/"lora_B") -> wire name
    deep_prompts: torch.Tensor | None
    frozen: bool = False  # an adapter held by the server (adapter_store.py): applied, never trained
    routing: AdapterHooks | None = None  # several held adapters routed per token (then `lora` is empty): never merged

    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        found = [tensor for pair in self.lora.values() for tensor in pair]
        return found + ([self.deep_prompts] if self.deep_prompts is not None else [])

    def requires_grad_(self) -> ParsedAdapter:
        if self.frozen:
            return self
        for tensor in self.tensors():
            tensor.requires_grad_(True)
        return self


def parse_adapter(message: pb.Adapter, runner: SpanRunner, start: int, end: int, max_rank: int) -> ParsedAdapter | None:
    """Check every adapter tensor against the blocks it names; InvalidRequest names the first problem."""
    if not message.lora and not message.HasField("deep_prompts"):
        return None
    rank = message.lora_rank
    lora: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names: dict[tuple[int, str, str], str] = {}
    if message.lora:
        if not 0 < rank <= max_rank:
            raise InvalidRequest(f"LoRA rank {rank} is outside 1..{max_rank} (this server's limit)")
        if not (math.isfinite(message.lora_alpha) and message.lora_alpha > 0 and 0 <= message.lora_dropout < 1):
            raise InvalidRequest("LoRA alpha must be positive and dropout in [0, 1)")
    for named in message.lora:
        block, path, kind = _split_name(named.name)
        if not start <= block < end:
            raise InvalidRequest(f"adapter tensor {named.name!r} is for block {block}, outside the requested blocks {start}:{end}")
        linear = linear_at(runner, block, path, named.name)
        if (block, path, kind) in names:
            raise InvalidRequest(f"adapter tensor {named.name!r} appears twice")
        expected = (rank, linear.in_features) if kind == "lora_A" else (linear.out_features, rank)
        if tuple(named.tensor.shape) != expected:  # the declared shape, before decoding anything
            raise InvalidRequest(f"adapter tensor {named.name!r} has shape {tuple(named.tensor.shape)}, expected {expected}")
        tensor = decode(named.tensor).float()
        if not torch.isfinite(tensor).all():
            raise InvalidRequest(f"adapter tensor {named.name!r} contains NaN or Inf")
        lora.setdefault((block, path), {})[kind] = tensor
        names[(block, path, kind)] = named.name
    for (block, path), pair in lora.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise InvalidRequest(f"block {block} {path}: LoRA needs both lora_A and lora_B")
    deep_prompts = None
    if message.HasField("deep_prompts"):
        shape = tuple(message.deep_prompts.shape)
        hidden = runner.config.hidden_size
        if len(shape) != 3 or shape[0] != end - start or shape[2] != hidden:
            raise InvalidRequest(f"deep prompts must have shape ({end - start}, length, {hidden}), got {shape}")
        if not 0 < shape[1] <= MAX_PROMPT_LENGTH:
            raise InvalidRequest(f"deep prompts must be finite, 1..{MAX_PROMPT_LENGTH} tokens long")
        deep_prompts = decode(message.deep_prompts).float()
        if not torch.isfinite(deep_prompts).all():
            raise InvalidRequest(f"deep prompts must be finite, 1..{MAX_PROMPT_LENGTH} tokens long")
    scaling = message.lora_alpha / (math.sqrt(rank) if message.use_rslora else rank) if rank else 0.0
    pairs = {key: (pair["lora_A"], pair["lora_B"]) for key, pair in lora.items()}
    return ParsedAdapter(scaling, message.lora_dropout, pairs, names, deep_prompts)


def _split_name(name: str) -> tuple[int, str, str]:
    block, _, rest = name.partition(".")
    path, _, kind = rest.rpartition(".")
    if not block.isdigit() or kind not in ("lora_A", "lora_B") or not path:
        raise InvalidRequest(f"adapter tensor name {name!r} must look like '<block>.<module path>.lora_A' or '.lora_B'")
    return int(block), path, kind


def linear_at(runner: SpanRunner, block: int, path: str, name: str) -> nn.Module:
    layer = runner.layers[block - runner.start]
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        raise InvalidRequest(f"adapter tensor {name!r}: block {block} has no module {path!r}") from None
    if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
        raise InvalidRequest(f"adapter tensor {name!r}: {path!r} is not a linear layer")
    return module


@contextlib.contextmanager
def applied(runner: SpanRunner, adapter: ParsedAdapter | None, start: int, position: int = 0,
            training: bool = False, seed: int = 0) -> Iterator[None]:
    """Hooks that add the adapter to blocks [start, ...) while the block is inside this context.

    `position`: where the hidden states start in the sequence (deep prompts cover its first
    positions). `training` enables LoRA dropout, drawn from `seed` so that a recompute matches.
    """
    if adapter is None:
        yield
        return
    handles = []
    generator = torch.Generator().manual_seed(seed)
    for (block, path), (lora_a, lora_b) in adapter.lora.items():
        module = runner.layers[block - runner.start].get_submodule(path)
        handles.append(module.register_forward_hook(_lora_hook(lora_a, lora_b, adapter, training, generator)))
    if adapter.deep_prompts is not None:
        for offset in range(adapter.deep_prompts.shape[0]):
            layer = runner.layers[start + offset - runner.start]
            handles.append(layer.register_forward_pre_hook(_prompt_hook(adapter.deep_prompts[offset], position), with_kwargs=True))
    if adapter.routing is not None:
        handles += adapter.routing.install(runner)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _lora_hook(lora_a: torch.Tensor, lora_b: torch.Tensor, adapter: ParsedAdapter, training: bool, generator: torch.Generator):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(lora_a.dtype)
        if training and adapter.dropout > 0:
            keep = torch.empty_like(x).bernoulli_(1 - adapter.dropout, generator=generator)
            x = x * keep / (1 - adapter.dropout)
        return output + ((x @ lora_a.T) @ lora_b.T * adapter.scaling).to(output.dtype)

    return hook


def _prompt_hook(prompts: torch.Tensor, position: int):  # noqa: ANN202
    """Adds prompts (length, hidden) to the hidden states of sequence positions below `length`."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0]
        covered = min(prompts.shape[0] - position, hidden.shape[1])
        if covered <= 0:
            return args, kwargs
        added = torch.zeros_like(hidden)
        added[:, :covered] = prompts[position : position + covered].to(hidden.dtype)
        return (hidden + added, *args[1:]), kwargs

    return hook
