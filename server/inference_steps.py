"""Inference steps as data, and running one alone or several sessions' steps as one batched forward.

A step is what the compute worker runs for a session: new hidden states at the session's
position, its cache, its padding mask and adapter. Steps with the same `merge_key` (same span of
the same blocks, the same number of new tokens, and no adapter or one held by this server) may run
together: their rows are stacked into one batch, each row keeps its own positions, and attention
sees each session's own keys and values only (server/kv_cache.py MergedCache); each row's held
adapter is added as a per-row LoRA correction to the one base forward (server/mixed_lora.py). So
every session gets what it would get alone, up to float rounding of a larger matrix product.
Steps with a caller's own (trainable) adapter or deep prompts never merge: hooks apply them to a
whole forward.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable

import torch

from swarm.server.adapters import ParsedAdapter, applied
from swarm.server.kv_cache import MergedCache, Member, SessionCache
from swarm.server.mixed_lora import applied_per_row
from swarm.server.span_runner import SpanRunner

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class InferenceStep:
    runner: SpanRunner
    start: int
    end: int
    hidden: torch.Tensor  # (batch, new_tokens, hidden)
    position: int  # where the new tokens start; the cache holds exactly the positions below it
    cache: SessionCache
    padding_mask: torch.Tensor | None  # (batch, position + new_tokens), True for real tokens; None: no pads
    adapter: ParsedAdapter | None

    @property
    def merge_key(self) -> Hashable | None:
        """Steps with equal keys can share a forward; None: this step always runs alone."""
        adapter = self.adapter
        if adapter is not None and (not adapter.frozen or adapter.deep_prompts is not None or adapter.routing is not None):
            return None
        return (self.runner, self.start, self.end, self.hidden.shape[1])

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    def run_alone(self) -> torch.Tensor:
        """This step's output (batch, new_tokens, hidden), written into its own cache."""
        self.cache.truncate(self.position)  # a retry after a failed merged forward starts clean
        with torch.inference_mode(), applied(self.runner, self.adapter, self.start, position=self.position):
            return self.runner(self.hidden, self.start, self.end, position=self.position, cache=self.cache,
                               padding_mask=self.padding_mask)


def run_merged(steps: list[InferenceStep]) -> list[torch.Tensor]:
    """Steps of several sessions (equal merge keys) as one forward; each session's output, in order."""
    first = steps[0]
    runner, new_tokens = first.runner, first.hidden.shape[1]
    members = []
    for step in steps:
        step.cache.truncate(step.position)
        members.append(Member(step.cache, step.position, step.hidden.shape[0]))
    cache = MergedCache(members, first.start, first.end, new_tokens)
    hidden = torch.cat([step.hidden.to(runner.compute_dtype) for step in steps])
    device = hidden.device
    position_ids = torch.cat([
        runner.position_ids(step.position, new_tokens, step.padding_mask, device).expand(step.hidden.shape[0], -1)
        for step in steps
    ])
    mask = cache.padding_mask([step.padding_mask for step in steps])
    rows = [step.hidden.shape[0] for step in steps]
    with torch.inference_mode(), applied_per_row(runner, [step.adapter for step in steps], rows):
        output = runner.run(hidden, first.start, first.end, position_ids, cache, mask)
    return list(output.split(rows))


def run_steps(steps: list[InferenceStep]) -> tuple[list[torch.Tensor | Exception], bool]:
    """One step alone, or several merged: (each step's output or error, whether they ran merged).

    If a merged forward fails, each step runs alone so that an error reaches only the session it
    belongs to (positions are explicit, so a retry is exact)."""
    if len(steps) > 1:
        try:
            return list(run_merged(steps)), True
        except Exception:
            logger.exception("a merged forward of %d inference steps failed; running them one by one", len(steps))
    results: list[torch.Tensor | Exception] = []
    for step in steps:
        try:
            results.append(step.run_alone())
        except Exception as e:  # delivered to that step's session, which reports it
            results.append(e)
    return results, False
