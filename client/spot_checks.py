"""Spot-check verification: re-run a fraction of the work on independent servers and compare.

A server among strangers may return wrong activations (a bug, a bad GPU, or on purpose), and
nothing in a reply's shape gives that away. With `verify_fraction=f`, about a fraction f of the
forward hops and inference steps is re-computed as a stateless forward of the same inputs on a
route over the same blocks that avoids the server being checked (for an inference step, the hop's
whole input history plus the new tokens, so the verifier needs no session); the outputs must agree
within the wire codec's tolerance. On a disagreement a third, independent route decides: the side
that disagrees with the other two is banned for good in this client and logged as a liar. If no
third route exists (after a few fresh looks at the DHT) the client cannot tell who lies, and
raises UnverifiableResult rather than hand back an answer it knows may be wrong.

What this does not catch: a liar on every replica of some blocks, or a lie on an unchecked step
(the chance of missing a server that lies on every step falls as (1-f)^steps).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random

import torch

from swarm.errors import RoutingError, UnverifiableResult, WrongResult
from swarm.client.remote_calls import AdapterPayload, ServerFailure, forward_on_route
from swarm.client.swarm_client import SwarmClient

logger = logging.getLogger(__name__)

# Relative L2 difference two honest servers may show, by the codec on the wire (both ways). fp32
# servers agree to ~1e-6; int8 round trips differ by ~1% per hop (scripts/bench_codecs.py).
TOLERANCE = {"none": 1e-3, "fp16": 1e-2, "bf16": 3e-2, "int8": 0.1, "nf4": 0.3}


REFEREE_ATTEMPTS = 3  # fresh DHT reads while looking for a third route (a read may miss a record)
REFEREE_RETRY_DELAY = 0.5  # seconds


@dataclasses.dataclass
class SpotChecker:
    client: SwarmClient
    fraction: float  # of hops and steps to verify, 0..1
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    checks: int = 0  # comparisons made
    skipped: int = 0  # checks due but impossible (no other route over the blocks)
    liars: set[str] = dataclasses.field(default_factory=set)

    def due(self) -> bool:
        return self.fraction > 0 and self.rng.random() < self.fraction

    @property
    def tolerance(self) -> float:
        codecs = self.client.codecs
        return max(TOLERANCE.get(codecs.send, 0.3), TOLERANCE.get(codecs.receive, 0.3))

    async def verify(
        self, peer_id: str, start: int, end: int, inputs: torch.Tensor, output: torch.Tensor, adapter: AdapterPayload | None,
        padding_mask: torch.Tensor | None = None,
    ) -> None:
        """Check `output` (batch, n, hidden), the last n positions of what server `peer_id` computed for
        blocks [start, end) on `inputs` (batch, seq, hidden, seq >= n). Raises WrongResult if it lied."""
        second = await self._recompute(start, end, inputs, adapter, padding_mask, exclude={peer_id})
        if second is None:
            self.skipped += 1
            logger.debug("spot check of %s skipped: no other route over blocks %d:%d", peer_id[-8:], start, end)
            return
        self.checks += 1
        second_output, second_peers = second
        tail = second_output[:, -output.shape[1] :]
        if self._agree(output, tail):
            return
        third = None
        for attempt in range(REFEREE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(REFEREE_RETRY_DELAY)
            third = await self._recompute(start, end, inputs, adapter, padding_mask, exclude={peer_id, *second_peers})
            if third is not None:
                break
        if third is None:
            others = "+".join(p[-8:] for p in second_peers)
            raise UnverifiableResult(
                f"servers {peer_id[-8:]} and {others} disagree on blocks {start}:{end} and no third server can tell "
                "which is right; add servers of those blocks, or pass verify_fraction=0 to accept unverified results"
            )
        referee = third[0][:, -output.shape[1] :]
        if self._agree(tail, referee):
            self._convict(peer_id, start, end)
            raise WrongResult(peer_id, f"returned wrong outputs for blocks {start}:{end} (two other servers agree)")
        if self._agree(output, referee):
            for liar in second_peers:
                self._convict(liar, start, end)
            return
        raise UnverifiableResult(f"three routes over blocks {start}:{end} disagree with each other")

    def _agree(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        difference = torch.linalg.vector_norm((a.float() - b.float())) / (torch.linalg.vector_norm(b.float()) + 1e-6)
        return bool(difference <= self.tolerance)

    def _convict(self, peer_id: str, start: int, end: int) -> None:
        self.liars.add(peer_id)
        self.client.bans.ban_forever(peer_id)
        logger.error("server %s returned wrong outputs for blocks %d:%d; it is banned for good in this client", peer_id, start, end)

    async def _recompute(
        self, start: int, end: int, inputs: torch.Tensor, adapter: AdapterPayload | None, padding_mask: torch.Tensor | None,
        exclude: set[str],
    ) -> tuple[torch.Tensor, list[str]] | None:
        """The output of blocks [start, end) on `inputs` from servers outside `exclude`, and who computed
        it; None if no such route exists or it fails (a failing verifier is banned as usual)."""
        try:
            tokens = inputs.shape[0] * inputs.shape[1]
            route = await self.client.forward_route(start, end, tokens, exclude=frozenset(exclude), wait=False)
            return await forward_on_route(self.client, route, inputs, adapter, padding_mask), [hop.peer_id for hop in route]
        except RoutingError:
            return None
        except ServerFailure as failure:
            self.client.bans.ban(failure.peer_id)
            return None
