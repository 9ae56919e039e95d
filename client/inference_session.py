"""An inference session across the whole route, surviving servers that fail mid-generation.

One server-side session (stream) per hop. This object is the one owner of the client's session
state: the position (tokens per sequence whose keys and values the servers hold), prompt tuning's
prefix, the token history that lets a later generate() reuse a shared prefix, the padding mask and
each hop's inputs. A step may start below the position (the servers roll their caches back), never
above it. When a server fails, the client bans it, opens a new chain for the same blocks, replays
that hop's inputs there, and carries on at the same position: the tokens are the same as without
failure.

Steps are pushed server to server when the client allows it (`SwarmClient.push`): the client sends
to the first server only, each server pushes its output to the next one's session and reports it
to the client too, and the last one answers. Those reports fill the replay records off the critical
path (`_settle`); any break in the chain sends the step on through the client from where it broke.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import torch

from swarm.errors import InvalidRequest, RemoteError
from swarm.limits import PUSH_MAX_BYTES, STEP_TIMEOUT
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import extend_padding_mask
from swarm.client.adapters import RequestAdapter
from swarm.client.event_loop import run_sync
from swarm.client.retry import BLAMABLE, Attempts, ServerFailure, with_rerouting
from swarm.client.routing import RouteHop
from swarm.client.span_session import SpanSession, next_step_id
from swarm.client.swarm_client import SwarmClient

logger = logging.getLogger(__name__)

MAX_UNSETTLED = 16  # pushed steps whose reports may be outstanding before the next step waits for them


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

    def take_reorder(self) -> torch.Tensor | None:
        """The reorder to send with the next step (once)."""
        rows, self.pending_reorder = self.pending_reorder, None
        return rows

    @property
    def peer_id(self) -> str:
        return self.span.peer_id

    def record(self, position: int, hidden_states: torch.Tensor) -> None:
        """Remember inputs sent at `position`, forgetting anything at or after it (a rollback)."""
        if self.chunks and position == self.chunks[-1][0] + self.chunks[-1][1].shape[1]:
            self.chunks.append((position, hidden_states))  # the usual decode step: nothing to forget
            return
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


@dataclasses.dataclass(eq=False)
class _Step:
    """One step of the session: its inputs and, once pushed, the chain it took and each hop's pending report."""

    step_id: int
    position: int
    hidden_states: torch.Tensor  # (batch, new_tokens, hidden): the first hop's inputs
    new_mask: torch.Tensor | None  # (batch, new_tokens), True for real tokens; None: no pads among them
    mask: torch.Tensor | None  # (batch, position + new_tokens): the whole padding mask after this step
    hops: list[_Hop] = dataclasses.field(default_factory=list)
    reorders: list[torch.Tensor | None] = dataclasses.field(default_factory=list)  # sent to each hop with it
    replies: list[asyncio.Future[pb.StepResult]] = dataclasses.field(default_factory=list)  # by hop
    output: torch.Tensor | None = None  # the last hop's reply, once decoded and checked (not decoded again to settle)


class InferenceSession:
    def __init__(self, client: SwarmClient, max_length: int, batch_size: int, adapter: RequestAdapter | None = None):
        self.client = client
        self.max_length = max_length
        self.batch_size = batch_size
        self.adapter = adapter  # applied by the servers to every step
        self.position = 0
        self.prefix_length = 0  # trainable prompts (prompt tuning) before the tokens, once sent
        self._hops: list[_Hop] = []
        self._pushed: list[_Step] = []  # pushed steps whose hops' reports are not in the records yet, oldest first
        # Token ids the servers have processed, (batch, position), and the last full sequence that
        # generate() returned: they let a later generate() call continue or reuse a shared prefix.
        self.token_ids: torch.Tensor | None = None
        self.last_output: torch.Tensor | None = None
        # Which positions hold real tokens, (batch, position), True = real; None while nothing was padded.
        # The servers keep their own copy; this one is for replaying history after a failover.
        self.padding_mask: torch.Tensor | None = None

    @property
    def tokens_seen(self) -> int:
        """Tokens per sequence the servers hold, not counting prompt tuning's trainable prompts before them."""
        return self.position - self.prefix_length

    def resume(self, inputs: torch.Tensor | None, reuse_prefix: bool = True) -> torch.Tensor:
        """Get ready for a generate() call on `inputs` (batch, seq) (None: continue the last one's output):
        reuse the longest prefix the servers hold, at least one token being new. Returns the inputs.

        Assisted generation passes `reuse_prefix=False`: its first pass hands the model the whole
        sequence (plain decoding's prefill slices off what the cache holds, assisted decoding's does
        not), so the servers start over."""
        if inputs is None:
            if self.last_output is None:
                raise InvalidRequest("generate(None) continues a session, but this session has generated nothing yet")
            inputs = self.last_output
        reused = min(_common_prefix_length(self.token_ids, inputs), inputs.shape[1] - 1) if reuse_prefix else 0
        if reused == 0:
            self.position = self.prefix_length = 0  # start over: prompts (if any) go in again
        else:
            self.position = self.prefix_length + reused
        return inputs

    def prompts_sent(self, length: int) -> None:
        """Prompt tuning put `length` trainable prompts before the tokens at position 0."""
        self.prefix_length = length

    def generated(self, sequences: torch.Tensor) -> None:
        """What a generate() call returned (batch, seq): the servers hold all of it but maybe the last token."""
        self.token_ids = sequences[:, : self.tokens_seen]
        self.last_output = sequences

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
        self, start: int, end: int, history: torch.Tensor | None, history_mask: torch.Tensor | None = None,
        pusher: str | None = None,
    ) -> list[_Hop]:
        """Open sessions on a fresh route over [start, end) and replay `history` (with its padding mask) through it.

        Each session accepts pushes from the hop before it: `pusher` (the server before `start`, if any) for the first.
        """
        held = self.adapter.held_hash if self.adapter is not None else ""
        route = await self.client.inference_route(start, end, min_cache_tokens=self.batch_size * self.max_length, adapter=held)
        spans = [
            SpanSession(
                self.client.p2p, planned.peer_id, planned.start, planned.end, self.max_length, self.batch_size, self.client.codecs,
                self.adapter.message(planned.start, planned.end) if self.adapter is not None else None,
                pushers=[previous] if previous is not None else [],
            )
            for planned, previous in zip(route, [pusher, *(planned.peer_id for planned in route[:-1])])
        ]
        opened = await asyncio.gather(*(span.open() for span in spans), return_exceptions=True)  # one round trip for all
        hops = [_Hop(span) for span, error in zip(spans, opened) if error is None]
        try:
            for span, error in zip(spans, opened):
                if isinstance(error, BaseException):
                    if isinstance(error, BLAMABLE):
                        raise ServerFailure(span.peer_id, error) from error
                    raise error
            for hop in hops:
                if history is not None:
                    hop.record(0, history)
                    try:
                        history = await hop.span.step(history, 0, history_mask)  # split within the server's limits
                    except BLAMABLE as e:
                        raise ServerFailure(hop.peer_id, e) from e
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
        step = _Step(next_step_id(), position, hidden_states, new_mask, mask)
        output = run_sync(self._push(step) if self._can_push(hidden_states) else self._relay(step))
        self.position = position + hidden_states.shape[1]
        self.padding_mask = mask
        return output

    def _can_push(self, hidden_states: torch.Tensor) -> bool:
        """Push server to server if the client wants it and the step fits one unary message and every
        server's per-step limit (a long prefill goes through the client, split per server). With spot
        checks on, steps go through the client, which checks each hop before the next one sees it."""
        tokens = hidden_states.shape[0] * hidden_states.shape[1]
        return (
            self.client.push and len(self._hops) > 1 and self.client.spot_checker is None
            and hidden_states.numel() * 4 <= PUSH_MAX_BYTES and all(tokens <= hop.span.max_tokens_per_step for hop in self._hops)
        )

    async def _push(self, step: _Step) -> torch.Tensor:
        """One step pushed server to server: sent to the first hop only, the final output from the last.

        Every hop but the last also reports its output to the client (the next hop's inputs, kept for
        replay); those reports are settled later, off the critical path. Any failure (a stream error,
        a refused push, a timeout) settles this step through the client, replaying where needed.
        """
        await self._settle(wait=len(self._pushed) >= MAX_UNSETTLED)
        hops = list(self._hops)
        step.hops = hops
        step.reorders = [hop.take_reorder() for hop in hops]
        step.replies = [hop.span.expect(step.step_id) for hop in hops]
        push_to = [
            pb.PushHop(peer_id=hop.peer_id, session_id=hop.span.session_id, reorder=rows.tolist() if rows is not None else [])
            for hop, rows in zip(hops[1:], step.reorders[1:])
        ]
        hops[0].span.send_step(step.hidden_states, step.position, step.new_mask, step.reorders[0], step.step_id, push_to)
        self._pushed.append(step)
        final = step.replies[-1]
        waiting = set(step.replies)
        while not final.done():
            done, waiting = await asyncio.wait(waiting, timeout=STEP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            if not done or any(future.exception() is not None or future.result().push_error for future in done):
                break  # settle it hop by hop, through the client where the chain broke
        if final.done() and final.exception() is None:
            try:
                output = hops[-1].span.output_of(final.result(), tuple(step.hidden_states.shape))
            except RemoteError:
                pass
            else:
                self.client.bans.succeeded(hops[-1].peer_id)
                step.output = output
                return output
        output = await self._settle(wait=True, until=step)
        assert output is not None, "a pushed step is settled by the time its own settling returns"
        return output

    async def _settle(self, wait: bool, until: _Step | None = None) -> torch.Tensor | None:
        """Take the reports of pushed steps, oldest first, into the replay records; without `wait`, only
        steps whose reports have all arrived. Returns `until`'s final output once it is settled."""
        while self._pushed and (wait or all(future.done() for future in self._pushed[0].replies)):
            step = self._pushed.pop(0)
            output = await self._settle_step(step)
            if step is until:
                return output
        return None

    async def _settle_step(self, step: _Step) -> torch.Tensor:
        """A pushed step's reports, hop by hop, into the records; from the first hop that failed (or could not
        push on), the step goes on through the client (`_relay`), which replaces failed servers."""
        inputs = step.hidden_states
        for index, hop in enumerate(step.hops):
            try:
                if hop not in self._hops:
                    raise RemoteError(hop.peer_id, "replaced after an earlier failure")
                result = await hop.span.reply(step.replies[index])
                last = index + 1 == len(step.hops)
                output = step.output if last and step.output is not None else hop.span.output_of(result, tuple(inputs.shape))
            except BLAMABLE:
                return await self._relay(step, self._index_at(hop.span.start), inputs)
            self.client.bans.succeeded(hop.peer_id)
            hop.record(step.position, inputs)
            if index + 1 < len(step.hops) and result.push_error:
                logger.info("server %s could not push to the next server (%s); sending the step on from here",
                            hop.peer_id[-8:], result.push_error)
                return await self._relay(step, self._index_at(step.hops[index + 1].span.start), output)
            inputs = output
        return inputs

    def _index_at(self, block: int) -> int:
        """Index in the current chain of the hop that starts at `block` (a replaced hop's replacement starts there too)."""
        return next(index for index, hop in enumerate(self._hops) if hop.span.start == block)

    async def _relay(self, step: _Step, index: int = 0, hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """The step through the chain from hop `index` (with these inputs), each hop's output back to the
        client before the next hop; a failed server is replaced and its history replayed elsewhere.

        A step that was pushed is settled in order (`_settle`), so every earlier step is in the records."""
        if not step.hops:
            await self._settle(wait=True)  # replays need every earlier step's records
        hidden_states = step.hidden_states if hidden_states is None else hidden_states
        position, mask = step.position, step.mask
        reorders = dict(zip(map(id, step.hops), step.reorders)) if step.hops else {}
        attempts = Attempts(self.client.bans, f"inference step at position {position}")
        while index < len(self._hops):
            hop = self._hops[index]
            reorder = reorders.pop(id(hop)) if id(hop) in reorders else hop.take_reorder()
            try:
                output = await hop.span.step(hidden_states, position, step.new_mask, reorder, step.step_id)
                await self._spot_check(hop, position, hidden_states, output, mask)
            except BLAMABLE as e:
                attempts.failed(hop.peer_id, e)  # bans it (RoutingError after too many failures)
                logger.warning("replaying blocks %d:%d elsewhere from position %d", hop.span.start, hop.span.end, position)
                await self._replace(index, position, mask)
                continue
            self.client.bans.succeeded(hop.peer_id)
            hop.record(position, hidden_states)
            hidden_states = output
            index += 1
        return hidden_states

    async def _replace(self, index: int, position: int, mask: torch.Tensor | None) -> None:
        """Replace hop `index` (its server banned already) by a new chain for its blocks with its history
        replayed, and let the next hop accept pushes from the new chain's last server."""
        hop = self._hops[index]
        asyncio.get_running_loop().create_task(_close_all([hop]))
        history = hop.history(position)
        history_mask = mask[:, :position] if mask is not None else None
        pusher = self._hops[index - 1].peer_id if index > 0 else None
        replacement = await with_rerouting(
            lambda: self._open_chain(hop.span.start, hop.span.end, history, history_mask, pusher),
            self.client.bans,
            f"replacing blocks {hop.span.start}:{hop.span.end}",
        )
        self._hops[index : index + 1] = replacement
        following = index + len(replacement)
        if following < len(self._hops):
            try:
                await self._hops[following].span.grant([replacement[-1].peer_id])
            except BLAMABLE as e:  # that server is failing too: its next step finds out and replaces it
                logger.info("server %s did not take the new pusher: %s", self._hops[following].peer_id[-8:], e)

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
        run_sync(self._settle(wait=True))  # the records to permute must be complete
        for hop in self._hops:
            hop.reorder(rows)
        if self.padding_mask is not None:
            self.padding_mask = self.padding_mask[rows]

    def close(self) -> None:
        hops, self._hops, self._pushed = self._hops, [], []
        if hops:
            run_sync(_close_all(hops))

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _common_prefix_length(seen: torch.Tensor | None, inputs: torch.Tensor) -> int:
    if seen is None or seen.shape[0] != inputs.shape[0]:
        return 0
    length = min(seen.shape[1], inputs.shape[1])
    differs = (seen[:, :length] != inputs[:, :length]).any(dim=0).nonzero()
    return int(differs[0]) if len(differs) else length


async def _close_all(hops: list[_Hop]) -> None:
    await asyncio.gather(*(hop.span.close() for hop in hops), return_exceptions=True)
