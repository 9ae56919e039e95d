"""Routing each input among published adapters, without a trained router (`model.set_adapter_router`).

Two methods, over 2..16 adapters published in the swarm (one base model, rank and set of target
modules: swarm/adapter_routing.py):

- "arrow": every request names all the adapters (by hash) and the servers run peft's Arrow for
  their blocks: per token and per layer, the top-k adapters by alignment of the token with each
  adapter's principal direction, mixed (server/adapter_routing.py). Exactly peft's Arrow; every
  step of every request does the routing, and such steps never batch with other sessions'.
- "prompt": one choice per prompt. Before the prompt is served, its hidden states go once through
  the base model's first `prompt_blocks` blocks with `arrow_score`: each server sums, per adapter,
  |cos| between the inputs of every target layer (real tokens only) and the adapter's principal
  direction there (the same prototypes Arrow uses). The adapter with the highest mean wins and the
  prompt is then served with it alone, on the ordinary held-adapter path (batched with others).

Scores come from servers, so each reply is bounded and checked (one value per adapter, finite,
between 0 and the number of target layers times real tokens); a server that breaks that is
blamed and the hop rerouted. A lying server can still skew a choice it scores: it never sees
more than that.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from collections.abc import Iterator

import torch
from google.protobuf.internal.containers import RepeatedScalarFieldContainer

from swarm.adapter_manifest import AdapterManifest
from swarm.adapter_routing import METHODS, check_routable, check_top_k, targets
from swarm.errors import ConfigError, InvalidRequest, RemoteError
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.client.adapter_registry import SPEC_PREFIX, AdapterRegistry
from swarm.client.adapters import HeldLora, RequestAdapter
from swarm.client.event_loop import run_sync
from swarm.client.remote_calls import forward_hop
from swarm.client.retry import ServerFailure, with_rerouting
from swarm.client.swarm_client import SwarmClient

logger = logging.getLogger(__name__)

SCORE_SLACK = 1e-3  # relative rounding a server's |cos| sums may exceed their bound by

# The adapter the prompt router chose for the forward()/generate() call running in this thread or task,
# by id of the model: concurrent callers of one model each route their own prompt.
_chosen: contextvars.ContextVar[dict[int, HeldLora]] = contextvars.ContextVar("swarm_routed", default={})


class RoutedLora(HeldLora):
    """Several held adapters that requests name together: the servers route among them with Arrow."""

    def __init__(self, specs: list[str], hashes: list[str], top_k: int, score: bool = False):
        super().__init__(", ".join(specs), hashes[0])  # routing prefers holders of the first; others fetch the rest
        self.hashes = hashes
        self.top_k = top_k
        self.score = score  # ask for alignment scores (base blocks) instead of Arrow's output

    def fill(self, message: pb.Adapter, start: int, end: int) -> None:
        message.arrow_hashes.extend(self.hashes)
        message.arrow_top_k = self.top_k
        message.arrow_score = self.score


@dataclasses.dataclass
class AdapterRouter:
    """A model's router: the adapters (as the user named them), their hashes and manifests, how to route."""

    specs: list[str]
    hashes: list[str]
    manifests: list[AdapterManifest]
    method: str
    top_k: int
    prompt_blocks: int  # the first blocks whose inputs the prompt router scores

    @classmethod
    def create(cls, client: SwarmClient, specs: list[str], method: str, top_k: int, prompt_blocks: int | None) -> AdapterRouter:
        """Resolve every name and check that the set can be routed; ConfigError/InvalidRequest name the problem."""
        if method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if isinstance(specs, str) or not all(isinstance(spec, str) for spec in specs):
            raise ConfigError("names must be a list of published adapters, e.g. ['swarm:math', 'swarm:code@2']")
        for spec in specs:
            if not spec.startswith(SPEC_PREFIX):
                raise ConfigError(f"{spec!r} is not a published adapter: routers take names like 'swarm:NAME[@VERSION]'")
        if method == "prompt" and top_k != 1:
            raise ConfigError(f"the prompt router picks one adapter per prompt: top_k must be 1, got {top_k}")
        blocks = client.num_blocks
        if prompt_blocks is None:
            prompt_blocks = -(-blocks // 2)
        if not 1 <= prompt_blocks <= blocks:
            raise ConfigError(f"prompt_blocks must be between 1 and the model's {blocks} blocks, got {prompt_blocks}")
        registry = AdapterRegistry(client)
        hashes = [registry.resolve(spec)[1].hash for spec in specs]
        manifests = [registry.manifest(digest) for digest in hashes]  # verified against the hash
        for spec, manifest in zip(specs, manifests):
            if manifest.base != client.dht_prefix:
                raise ConfigError(f"{spec} is an adapter for base model {manifest.base}, not {client.dht_prefix}")
        check_routable(manifests, specs)
        check_top_k(top_k, len(specs))
        if method == "prompt" and not any(block < prompt_blocks for block, _ in targets(manifests[0])):
            raise ConfigError(f"the adapters adapt no layer of the first {prompt_blocks} blocks, which the prompt "
                              "router scores: pass a larger prompt_blocks")
        return cls(list(specs), hashes, manifests, method, top_k, prompt_blocks)

    def request_lora(self, model_id: int) -> HeldLora:
        """What requests carry now: every adapter (Arrow), or the one chosen for this call's prompt."""
        if self.method == "arrow":
            return RoutedLora(self.specs, self.hashes, self.top_k)
        chosen = _chosen.get().get(model_id)
        if chosen is None:
            raise InvalidRequest("the prompt router chooses an adapter per prompt: call forward() or generate() with the "
                                 "prompt (an inference_session() opened by hand has no prompt to route)")
        return chosen

    @contextlib.contextmanager
    def chosen(self, model_id: int, index: int) -> Iterator[None]:
        """Serve this thread's calls on the model with adapter `index` while inside."""
        token = _chosen.set({**_chosen.get(), model_id: HeldLora(self.specs[index], self.hashes[index])})
        try:
            yield
        finally:
            _chosen.reset(token)

    def scores(self, client: SwarmClient, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean |cos| of each adapter (adapters,) over the target layers of the first blocks and the real tokens
        of `hidden_states` (batch, seq, hidden), the inputs of block 0; all rows count (one choice per call)."""
        return run_sync(self._scores(client, hidden_states.detach(), padding_mask))

    def choose(self, client: SwarmClient, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> int:
        scores = self.scores(client, hidden_states, padding_mask)
        index = int(torch.argmax(scores))  # the first of equal scores
        logger.info("prompt router chose %s (mean |cos| %s)", self.specs[index],
                    ", ".join(f"{spec} {score:.4f}" for spec, score in zip(self.specs, scores.tolist())))
        return index

    async def _scores(self, client: SwarmClient, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        payload = RequestAdapter(RoutedLora(self.specs, self.hashes, 1, score=True), None)
        per_block: dict[int, int] = {}
        for block, _ in targets(self.manifests[0]):
            per_block[block] = per_block.get(block, 0) + 1
        real_tokens = int(padding_mask.sum()) if padding_mask is not None else hidden_states.shape[0] * hidden_states.shape[1]
        totals = torch.zeros(len(self.hashes), dtype=torch.float64)
        counted = 0
        position, state = 0, hidden_states
        tokens = hidden_states.shape[0] * hidden_states.shape[1]

        async def attempt() -> None:
            nonlocal position, state, totals, counted
            for hop in await client.forward_route(position, self.prompt_blocks, tokens, adapter=payload.held_hash):
                output, reply = await forward_hop(client, hop, state, payload, padding_mask)
                bound = real_tokens * sum(per_block.get(block, 0) for block in range(hop.start, hop.end))
                try:
                    totals = totals + checked_scores(hop.peer_id, reply.adapter_scores, len(self.hashes), bound)
                except RemoteError as e:
                    raise ServerFailure(hop.peer_id, e) from e
                counted += bound
                state, position = output, hop.end

        await with_rerouting(attempt, client.bans, f"adapter scores through blocks 0:{self.prompt_blocks}")
        return totals / max(counted, 1)


def checked_scores(peer_id: str, scores: RepeatedScalarFieldContainer[float] | list[float], count: int, bound: int) -> torch.Tensor:
    """A server's per-adapter score sums: `count` finite values in [0, bound] (bound: target layers x real tokens)."""
    if len(scores) != count:
        raise RemoteError(peer_id, f"sent {len(scores)} adapter scores for {count} adapters")
    values = [float(score) for score in scores]
    if not all(math.isfinite(value) and 0 <= value <= bound * (1 + SCORE_SLACK) for value in values):
        raise RemoteError(peer_id, f"sent adapter scores outside [0, {bound}] (sums of |cos| over {bound} layer inputs)")
    return torch.tensor(values, dtype=torch.float64)
