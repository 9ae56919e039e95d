"""An inference session across the whole route, surviving servers that fail mid-generation.

One server-side session (stream) per hop. The session's position is the number of tokens per
sequence whose keys and values the servers hold; a step may start below it (the servers roll
their caches back), never above it. Each hop keeps the hidden states it was sent, so when its
server fails the client bans that server, opens a new chain for the same blocks, replays the
history there, and carries on at the same position: the tokens are the same as without failure.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from swarm.errors import InvalidRequest, RoutingError
from swarm.wire.codecs import extend_padding_mask
from swarm.client.adapters import RequestAdapter
from swarm.client.event_loop import run_sync
from swarm.client.retry import BLAMABLE, ServerFailure, with_rerouting
from swarm.client.routing import RouteHop
from swarm.client.span_session import SpanSession
from swarm.client.swarm_client import SwarmClient

logger = logging.getLogger(__name__)


class _Hop:
    """A span session and the inputs it has been sent, (batch, position, hidden), for replay."""

    def __init__(self, span: SpanSession):
        self.span = span
        self.chunks: list[tuple[int, torch.Tensor]] = []  # (position of first token, hidden states)
        # Beam search: rows to permute the server's session by before the next step (batch,), or None.
        self.pending_reorder: torch.Tensor | None = None

    def reorder(self, rows: torch.Tensor) -> None:
        """Permute the session's rows: the kept inputs now, the server's cache with the next step."""
        self.chunks = [(start, chunk[rows]) for start, chunk in self.chunks]
        self.pending_reorder = rows if self.pending_reorder is None else self.pending_reorder[rows]

    @property
    def peer_id(self) -> str:
        return self.span.peer_id

    def record(self, position: int, hidden_states: torch.Tensor) -> None:
        """Remember inputs sent at `position`, forgetting anything at or after it (a rollback)."""
        kept = []
        for start, chunk in self.chunks:
            if start >= position:
                break
            kept.append((start, chunk[:, : position - start]))
        kept.append((position, hidden_states))
        self.chunks = kept

    def history(self, position: int) -> torch.Tensor | None:
        """Inputs for positions [0, position) as one tensor, or None if there are none."""
        pieces = [chunk[:, : max(0, position - start)] for start, chunk in self.chunks if start < position]
        return torch.cat(pieces, dim=1) if pieces else None


class InferenceSession:
    def __init__(self, client: SwarmClient, max_length: int, batch_size: int, adapter: RequestAdapter | None = None):
        self.client = client
        self.max_length = max_length
        self.batch_size = batch_size
        self.adapter = adapter  # applied by the servers to every step
        self.position = 0
        self.prefix_length = 0  # trainable prompts (prompt tuning) before the tokens, once sent
        self._hops: list[_Hop] = []
        # Token ids the servers have processed, (batch, position), and the last full sequence that
        # generate() returned: they let a later generate() call continue or reuse a shared prefix.
        self.token_ids: torch.Tensor | None = None
        self.last_output: torch.Tensor | None = None
        # Which positions hold real tokens, (batch, position), True = real; None while nothing was padded.
        # The servers keep their own copy; this one is for replaying history after a failover.
        self.padding_mask: torch.Tensor | None = None

    @property
    def route(self) -> list[RouteHop]:
        """The servers and blocks that this session uses now (it changes after a failover)."""
        return [RouteHop(hop.peer_id, hop.span.start, hop.span.end) for hop in self._hops]

    def open(self) -> InferenceSession:
        run_sync(self._open())
        logger.info("opened an inference session (max_length %d, batch %d) over %d servers", self.max_length, self.batch_size, len(self._hops))
        return self

    async def _open(self) -> None:
        self._hops = await with_rerouting(
            lambda: self._open_chain(0, self.client.num_blocks, None), self.client.bans, "opening an inference session"
        )

    async def _open_chain(
        self, start: int, end: int, history: torch.Tensor | None, history_mask: torch.Tensor | None = None
    ) -> list[_Hop]:
        """Open sessions on a fresh route over [start, end) and replay `history` (with its padding mask) through it."""
        held = self.adapter.held_hash if self.adapter is not None else ""
        route = await self.client.inference_route(start, end, min_cache_tokens=self.batch_size * self.max_length, adapter=held)
        hops: list[_Hop] = []
        try:
            for planned in route:
                adapter = self.adapter.message(planned.start, planned.end) if self.adapter is not None else None
                span = SpanSession(
                    self.client.p2p, planned.peer_id, planned.start, planned.end, self.max_length, self.batch_size,
                    self.client.codecs, adapter,
                )
                try:
                    await span.open()
                    hops.append(_Hop(span))
                    if history is not None:
                        hops[-1].record(0, history)
                        history = await span.step(history, 0, history_mask)  # split within the server's limits
                except BLAMABLE as e:
                    raise ServerFailure(planned.peer_id, e) from e
        except BaseException:
            await _close_all(hops)
            raise
        return hops

    def step(
        self, hidden_states: torch.Tensor, position: int | None = None, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run new tokens' hidden states (batch, new_tokens, hidden) through the route at `position`;
        `padding_mask` (batch, new_tokens), True for real tokens, if some of them are pads."""
        position = self.position if position is None else position
        if position > self.position:
            raise InvalidRequest(f"cannot step at position {position}: the session is at {self.position}")
        if hidden_states.shape[0] != self.batch_size:
            raise InvalidRequest(f"batch {hidden_states.shape[0]} differs from the session's batch {self.batch_size}")
        if position + hidden_states.shape[1] > self.max_length:
            raise InvalidRequest(
                f"the session's max_length {self.max_length} is too small for {position + hidden_states.shape[1]} tokens"
            )
        if padding_mask is not None and tuple(padding_mask.shape) != tuple(hidden_states.shape[:2]):
            raise InvalidRequest(f"padding mask of shape {tuple(padding_mask.shape)} does not match the tokens' {tuple(hidden_states.shape[:2])}")
        new_mask = padding_mask.bool() if padding_mask is not None and not bool(padding_mask.all()) else None
        mask = extend_padding_mask(self.padding_mask, position, new_mask, self.batch_size, hidden_states.shape[1])
        output = run_sync(self._step(hidden_states, position, new_mask, mask))
        self.position = position + hidden_states.shape[1]
        self.padding_mask = mask
        return output

    async def _step(
        self, hidden_states: torch.Tensor, position: int, new_mask: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        failures = 0
        index = 0
        while index < len(self._hops):
            hop = self._hops[index]
            try:
                output = await hop.span.step(hidden_states, position, new_mask, hop.pending_reorder)
                hop.pending_reorder = None
                await self._spot_check(hop, position, hidden_states, output, mask)
            except BLAMABLE as e:
                failures += 1
                if failures >= self.client.bans.policy.max_attempts:
                    raise RoutingError(f"inference step failed {failures} times; last error: {e}") from e
                logger.warning("server %s failed at position %d (%s); replaying blocks %d:%d elsewhere",
                               hop.peer_id[-8:], position, e, hop.span.start, hop.span.end)
                self.client.bans.ban(hop.peer_id)
                asyncio.get_running_loop().create_task(_close_all([hop]))
                history = hop.history(position)
                history_mask = mask[:, :position] if mask is not None else None
                self._hops[index : index + 1] = await with_rerouting(
                    lambda: self._open_chain(hop.span.start, hop.span.end, history, history_mask),
                    self.client.bans,
                    f"replacing blocks {hop.span.start}:{hop.span.end}",
                )
                continue
            self.client.bans.succeeded(hop.peer_id)
            hop.record(position, hidden_states)
            hidden_states = output
            index += 1
        return hidden_states

    async def _spot_check(
        self, hop: _Hop, position: int, hidden_states: torch.Tensor, output: torch.Tensor, mask: torch.Tensor | None
    ) -> None:
        """Maybe verify a hop's step: its whole input history plus the new tokens, as a stateless forward elsewhere."""
        checker = self.client.spot_checker
        if checker is None or not checker.due():
            return
        history = hop.history(position)
        inputs = hidden_states if history is None else torch.cat([history, hidden_states], dim=1)
        await checker.verify(hop.peer_id, hop.span.start, hop.span.end, inputs, output, self.adapter, mask)

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i of the session becomes old row rows[i] (rows: (batch,) long). Costs no round
        trip: the servers apply it with the next step; a replacement server replays reordered inputs."""
        if tuple(rows.shape) != (self.batch_size,):
            raise InvalidRequest(f"a reorder needs one row index per row of the session's batch {self.batch_size}")
        for hop in self._hops:
            hop.reorder(rows)
        if self.padding_mask is not None:
            self.padding_mask = self.padding_mask[rows]

    def close(self) -> None:
        hops, self._hops = self._hops, []
        if hops:
            run_sync(_close_all(hops))

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _close_all(hops: list[_Hop]) -> None:
    await asyncio.gather(*(hop.span.close() for hop in hops), return_exceptions=True)
