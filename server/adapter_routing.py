"""Routing among adapters held here, for this server's blocks: peft's Arrow, and per-prompt scores.

A request names 2..16 held adapters by hash (swarm/adapter_routing.py checks that they can be
combined). For each target linear layer of the span, peft's own `ArrowLoraLinearLayer` computes
every adapter's prototype (the top right singular vector of B @ A, by power iteration seeded with
ARROW_SEED, so every server and a local peft model get the same one), once per adapter set and
span (kept in a small LRU); then, per token, it picks the top-k adapters by |<token, prototype>|
and mixes their scaled updates with a softmax over the chosen scores: the layer is peft's, called
with the held matrices, so the result is a local peft Arrow model's.

With `arrow_score`, the blocks run without any adapter, and each target layer's input tokens are
scored against the same prototypes instead: per adapter, the sum over target layers and real
tokens of |cos(token, prototype)| (client/adapter_router.py turns these into one choice per prompt).

This module knows nothing about the wire beyond the Adapter message; fetching held adapters is
adapter_service.py's job.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging

import torch
from peft import ArrowConfig
from peft.tuners.lora.arrow import ArrowLoraLinearLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

from swarm.adapter_manifest import check_hash
from swarm.adapter_routing import ARROW_SEED, ARROW_TEMPERATURE, MAX_ROUTED_ADAPTERS, check_routable, check_top_k
from swarm.errors import InvalidRequest
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.server.adapter_service import AdapterService
from swarm.server.adapters import ParsedAdapter
from swarm.server.span_runner import SpanRunner

logger = logging.getLogger(__name__)

PROTOTYPE_SETS = 8  # (adapter set, span) entries whose prototypes are kept: each is E x in floats per target layer


class _Weight:
    """A matrix as peft's lora_A / lora_B modules present it to Arrow (`.weight`)."""

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


@dataclasses.dataclass
class _Target:
    """One target linear layer: peft's Arrow layer (prototypes built) and the held matrices it mixes, by hash."""

    arrow: ArrowLoraLinearLayer
    lora_a: dict[str, _Weight]  # A (rank, in)
    lora_b: dict[str, _Weight]  # B (out, rank)
    scaling: dict[str, float]


class RoutedAdapters:
    """The hooks of one request: Arrow's update on every target layer, or (scoring) the inputs' scores."""

    def __init__(self, targets: dict[tuple[int, str], _Target], top_k: int, padding_mask: torch.Tensor | None,
                 scoring: bool):
        self.targets = targets
        self.top_k = top_k
        self.padding_mask = padding_mask  # (batch, seq) True for real tokens; None: all real
        count = len(next(iter(targets.values())).scaling) if targets else 0
        self.scores: torch.Tensor | None = torch.zeros(count, dtype=torch.float64) if scoring else None  # (adapters,)

    def install(self, runner: SpanRunner) -> list[RemovableHandle]:
        handles = []
        for (block, path), target in self.targets.items():
            module = runner.layers[block - runner.start].get_submodule(path)
            hook = self._score_hook(target, self.scores) if self.scores is not None else self._arrow_hook(target)
            handles.append(module.register_forward_hook(hook))
        return handles

    def _arrow_hook(self, target: _Target):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            target.arrow.top_k = self.top_k  # the layer is shared by requests for this set; one computes at a time
            delta = target.arrow(args[0].contiguous(), lora_A=target.lora_a, lora_B=target.lora_b, dropout=nn.Identity(),
                                 scaling=target.scaling)
            return output + delta.to(output.dtype)

        return hook

    def _score_hook(self, target: _Target, scores: torch.Tensor):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]  # (batch, seq, in)
            tokens = x[self.padding_mask] if self.padding_mask is not None else x.reshape(-1, x.shape[-1])
            tokens = tokens.double()
            unit = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            scores.add_((unit @ target.arrow.prototypes.double().T).abs().sum(0))  # (adapters,)

        return hook


class AdapterRouting:
    """Parses requests that route among held adapters; keeps the prototypes of recent adapter sets."""

    def __init__(self, service: AdapterService):
        self.service = service
        self._prototypes: collections.OrderedDict[tuple, dict[tuple[int, str], ArrowLoraLinearLayer]] = collections.OrderedDict()

    async def parse(self, message: pb.Adapter, start: int, end: int, padding_mask: torch.Tensor | None,
                    scoring_allowed: bool) -> ParsedAdapter:
        """The request's routed adapters for blocks [start, end); InvalidRequest names the first problem."""
        hashes = list(message.arrow_hashes)
        if len(hashes) > MAX_ROUTED_ADAPTERS:
            raise InvalidRequest(f"routing needs at most {MAX_ROUTED_ADAPTERS} adapters, got {len(hashes)}")
        for digest in hashes:
            check_hash(digest)
        if message.lora or message.HasField("deep_prompts") or message.adapter_hash:
            raise InvalidRequest("routing among held adapters cannot be combined with another adapter or deep prompts")
        if message.arrow_score and not scoring_allowed:
            raise InvalidRequest("adapter scores are answered by forward requests only (not kept for backward, "
                                 "not in inference sessions)")
        held = await asyncio.gather(*(self.service.held(digest, start, end) for digest in hashes))
        check_routable([adapter.manifest for adapter in held], [digest[:12] for digest in hashes])
        if not message.arrow_score:
            check_top_k(message.arrow_top_k, len(hashes))
        parsed = [adapter.parsed(start, end) for adapter in held]
        layers = await self._layers(tuple(hashes), start, end, parsed)
        targets = {
            key: _Target(layer, {h: _Weight(p.lora[key][0]) for h, p in zip(hashes, parsed)},
                         {h: _Weight(p.lora[key][1]) for h, p in zip(hashes, parsed)},
                         {h: p.scaling for h, p in zip(hashes, parsed)})
            for key, layer in layers.items()
        }
        routed = RoutedAdapters(targets, message.arrow_top_k, padding_mask, scoring=message.arrow_score)
        return ParsedAdapter(0.0, 0.0, {}, {}, None, frozen=True, routing=routed)

    async def _layers(self, hashes: tuple[str, ...], start: int, end: int,
                      parsed: list[ParsedAdapter]) -> dict[tuple[int, str], ArrowLoraLinearLayer]:
        key = (hashes, start, end)
        layers = self._prototypes.get(key)
        if layers is None:
            layers = await asyncio.to_thread(_build_layers, hashes, parsed)
            self._prototypes[key] = layers
            while len(self._prototypes) > PROTOTYPE_SETS:
                self._prototypes.popitem(last=False)
            logger.info("computed Arrow prototypes of %d adapters for blocks %d:%d (%d target layers)",
                        len(hashes), start, end, len(layers))
        self._prototypes.move_to_end(key)
        return layers


def _build_layers(hashes: tuple[str, ...], parsed: list[ParsedAdapter]) -> dict[tuple[int, str], ArrowLoraLinearLayer]:
    """peft's Arrow layer for every target layer, its prototypes (adapters, in) computed by peft."""
    config = ArrowConfig(top_k=1, router_temperature=ARROW_TEMPERATURE, rng_seed=ARROW_SEED)
    config.task_adapter_names = list(hashes)
    layers = {}
    for key in parsed[0].lora:
        lora_a = {h: _Weight(p.lora[key][0]) for h, p in zip(hashes, parsed)}
        lora_b = {h: _Weight(p.lora[key][1]) for h, p in zip(hashes, parsed)}
        layer = ArrowLoraLinearLayer(in_features=lora_a[hashes[0]].weight.shape[1], arrow_config=config)
        layer.build_prototypes(lora_a, lora_b)
        layers[key] = layer
    return layers
