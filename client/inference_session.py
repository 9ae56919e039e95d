"""An inference session across the whole route: one server-side session (stream) per hop.

The session's position is the number of tokens per sequence whose keys and values the servers
hold. A step may start below it (the servers roll their caches back), never above it.
"""

from __future__ import annotations

import logging

import torch

from swarm.errors import InvalidRequest
from swarm.client.event_loop import run_sync
from swarm.client.routing import RouteHop
from swarm.client.span_session import SpanSession
from swarm.client.swarm_client import SwarmClient

logger = logging.getLogger(__name__)


class InferenceSession:
    def __init__(self, client: SwarmClient, max_length: int, batch_size: int):
        self.client = client
        self.max_length = max_length
        self.batch_size = batch_size
        self.position = 0
        self.route: list[RouteHop] = []
        self._spans: list[SpanSession] = []
        # Token ids the servers have processed, (batch, position), and the last full sequence that
        # generate() returned: they let a later generate() call continue or reuse a shared prefix.
        self.token_ids: torch.Tensor | None = None
        self.last_output: torch.Tensor | None = None

    def open(self) -> InferenceSession:
        self.route = self.client.make_route()
        run_sync(self._open_all())
        logger.info("opened an inference session (max_length %d, batch %d) over %d servers", self.max_length, self.batch_size, len(self.route))
        return self

    async def _open_all(self) -> None:
        for hop in self.route:
            span = SpanSession(self.client.p2p, hop.peer_id, hop.start, hop.end, self.max_length, self.batch_size)
            self._spans.append(span)
            await span.open()

    def step(self, hidden_states: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Run new tokens' hidden states (batch, new_tokens, hidden) through the route at `position`."""
        position = self.position if position is None else position
        if position > self.position:
            raise InvalidRequest(f"cannot step at position {position}: the session is at {self.position}")
        if hidden_states.shape[0] != self.batch_size:
            raise InvalidRequest(f"batch {hidden_states.shape[0]} differs from the session's batch {self.batch_size}")
        if position + hidden_states.shape[1] > self.max_length:
            raise InvalidRequest(
                f"the session's max_length {self.max_length} is too small for {position + hidden_states.shape[1]} tokens"
            )
        output = run_sync(self._step_all(hidden_states, position))
        self.position = position + hidden_states.shape[1]
        return output

    async def _step_all(self, hidden_states: torch.Tensor, position: int) -> torch.Tensor:
        for span in self._spans:
            hidden_states = await span.step(hidden_states, position)
        return hidden_states

    def close(self) -> None:
        spans, self._spans = self._spans, []
        if spans:
            run_sync(_close_all(spans))

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _close_all(spans: list[SpanSession]) -> None:
    for span in spans:
        await span.close()
