"""Inference sessions on a server: objects with ids, owned by the peer that opened them.

A session holds one client's state for a span: the KV cache, the padding mask, the position, the
adapter and the blocks. Its id is an unguessable capability (16 random bytes) that the owner hands
to the servers it names as pushers (the previous hop of its route, see server-to-server push in
handlers.py); a push is accepted only from one of those peers and only with the id, so neither the
id alone nor being a server of the route is enough. Steps come from the owner's stream or from a
pusher; `lock` runs them one at a time, in the order they arrive.

This module knows nothing of the wire or of compute: handlers.py reads steps, runs them and replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import Iterator, Sequence

import torch

from swarm.errors import InvalidRequest
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import decode_mask, extend_padding_mask
from swarm.server.adapters import ParsedAdapter
from swarm.server.kv_cache import SessionCache
from swarm.server.span_runner import SpanRunner

SESSION_ID_BYTES = 16
MAX_PUSHERS = 8  # peers one session may accept pushes from (one is the norm: the previous hop)
MAX_PUSH_HOPS = 64  # servers a pushed step may still travel through; more is not a route but a flood
MAX_PEER_ID_LENGTH = 128  # base58 of a libp2p peer id is about 46-53 characters
MAX_PENDING_PUSHES = 8  # pushed steps and reports in flight per session; a client has one step in flight


@dataclasses.dataclass(eq=False, kw_only=True)
class ServerSession:
    session_id: bytes
    owner: str  # peer id of the client that opened it; its compute is charged to this peer
    runner: SpanRunner  # the session keeps these blocks even if the server moves meanwhile
    start: int
    end: int
    batch_size: int
    max_length: int
    adapter: ParsedAdapter | None
    response_codec: str
    cache: SessionCache  # preallocated keys/values per block: (batch, kv_heads, max_length, head_dim)
    pushers: frozenset[str] = frozenset()
    mask: torch.Tensor | None = None  # (batch, position), True for real tokens; None while nothing was padded
    position: int = 0
    last_step_id: int = 0
    last_active: float = 0.0  # event-loop time of the last step, from the owner or a pusher
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    # What goes back to the owner's stream, in order; None ends the stream (after `error`, if set).
    outbox: asyncio.Queue[pb.InferenceResponse | None] = dataclasses.field(default_factory=asyncio.Queue)
    error: BaseException | None = None
    tasks: set[asyncio.Task] = dataclasses.field(default_factory=set)  # pushed steps and push reports in flight
    last_report: asyncio.Task | None = None  # the latest push's report to the owner: reports keep step order

    def begin_step(self, step: pb.InferenceStep, hidden: torch.Tensor) -> None:
        """Check a step (batch, position, mask) against the session, then apply its reorder and rollback.

        `hidden`: the step's decoded hidden states (batch, new_tokens, hidden). Call under `lock`;
        afterwards `position` and `mask` describe where the new tokens go.
        """
        batch, new_tokens = hidden.shape[0], hidden.shape[1]
        if batch != self.batch_size:
            raise InvalidRequest(f"step has batch {batch}, the session was opened with {self.batch_size}")
        if step.position > self.position:
            raise InvalidRequest(f"step starts at position {step.position}, past the session's position {self.position}")
        if step.position + new_tokens > self.max_length:
            raise InvalidRequest(f"step to position {step.position + new_tokens} is past the session's max_length {self.max_length}")
        new_mask = decode_mask(step.attention_mask, batch, new_tokens)
        repeated = step.step_id != 0 and step.step_id == self.last_step_id  # a replay of a step already applied
        if step.reorder and not repeated:
            rows = check_reorder(step.reorder, self.batch_size)
            self.cache.reorder_cache(rows)
            self.mask = self.mask[rows] if self.mask is not None else None
        if step.position < self.position:
            self.cache.crop(step.position - self.position)  # crop takes a negative count: drop the last tokens
        self.position = step.position
        self.mask = extend_padding_mask(self.mask, self.position, new_mask, batch, new_tokens)
        self.last_step_id = step.step_id

    def fail(self, error: BaseException) -> None:
        """End the session with `error`, reported to the owner (a pushed step that failed after it was accepted)."""
        if self.error is None:
            self.error = error
            self.outbox.put_nowait(None)

    def track(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class SessionRegistry:
    """The open sessions of a server by id; only a session's named pushers find it by id."""

    def __init__(self) -> None:
        self._sessions: dict[bytes, ServerSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @contextlib.contextmanager
    def opened(self, *, pushers: Sequence[str], **fields: object) -> Iterator[ServerSession]:
        """A new session with a fresh id, registered while the block runs; its tasks are cancelled at the end."""
        session = ServerSession(session_id=secrets.token_bytes(SESSION_ID_BYTES), pushers=check_pushers(pushers), **fields)  # type: ignore[arg-type]
        self._sessions[session.session_id] = session
        try:
            yield session
        finally:
            del self._sessions[session.session_id]
            for task in list(session.tasks):
                task.cancel()

    def for_push(self, session_id: bytes, pusher: str) -> ServerSession:
        """The session `session_id` if `pusher` may push into it; the same error whether it does not
        exist or does not accept this peer, so a refusal tells a prober nothing."""
        session = self._sessions.get(bytes(session_id))
        if session is None or pusher not in session.pushers:
            raise InvalidRequest("no session here accepts pushes from this peer under this id")
        return session


def check_pushers(pushers: Sequence[str]) -> frozenset[str]:
    if len(pushers) > MAX_PUSHERS or any(not 0 < len(peer) <= MAX_PEER_ID_LENGTH for peer in pushers):
        raise InvalidRequest(f"a session accepts pushes from at most {MAX_PUSHERS} peers, named by their peer ids")
    return frozenset(pushers)


def check_push_route(push_to: Sequence[pb.PushHop]) -> None:
    """The onward route of a pushed step: bounded, with ids of the right sizes (the target checks the rest)."""
    if len(push_to) > MAX_PUSH_HOPS:
        raise InvalidRequest(f"a step may be pushed through at most {MAX_PUSH_HOPS} servers")
    for hop in push_to:
        if not 0 < len(hop.peer_id) <= MAX_PEER_ID_LENGTH or len(hop.session_id) != SESSION_ID_BYTES:
            raise InvalidRequest("a push hop needs a peer id and a session id of 16 bytes")


def check_reorder(reorder: Sequence[int], batch_size: int) -> torch.Tensor:
    """A beam-search reordering of the session's rows: one source row per row, each within the batch."""
    if len(reorder) != batch_size or max(reorder) >= batch_size:
        raise InvalidRequest(f"reorder must give one row in 0..{batch_size - 1} for each of the session's {batch_size} rows")
    return torch.tensor(list(reorder), dtype=torch.long)
