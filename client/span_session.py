"""One inference stream to one server for one hop of the route: open, steps, close.

The server says at `open` how many tokens (batch x new tokens) one step may carry, and the session's
id (for server-to-server push); a longer step (a long prompt's prefill, a failover's replay) is
sent as consecutive steps within that limit. Every reply is checked (shape, decodability, finite
values) before it is used.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Sequence

import torch
from swarm.errors import CacheFull, InvalidRequest, PeerTimeout, RemoteError
from swarm.limits import CONNECT_TIMEOUT, DEFAULT_MAX_TOKENS_PER_REQUEST, STEP_TIMEOUT
from swarm.transport import P2P, open_stream, raise_for_error, translate_errors
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.frames import read_message, to_frames
from swarm.wire.codecs import encode, encode_mask
from swarm.wire.rpc import RPC_INFERENCE
from swarm.client.reply_checks import decode_reply
from swarm.client.wire_codecs import WireCodecs

logger = logging.getLogger(__name__)


_step_ids = itertools.count(1)


def next_step_id() -> int:
    """A step id unique in this process: a step keeps its id along a pushed chain and when replayed."""
    return next(_step_ids)


class SpanSession:
    """A server-side inference session over blocks [start, end) of one peer.

    After `open`, one reader task takes every reply off the stream and hands it to whoever waits for
    that step id (`expect`), so that the copies of pushed steps and the replies to the client's own
    steps can be awaited independently; a reply nobody waits for (a late duplicate) is dropped.
    """

    def __init__(
        self,
        p2p: P2P,
        peer_id: str,
        start: int,
        end: int,
        max_length: int,
        batch_size: int,
        codecs: WireCodecs,
        adapter: pb.Adapter | None = None,
        pushers: Sequence[str] = (),
    ):
        self.p2p = p2p
        self.codecs = codecs
        self.adapter = adapter
        self.peer_id = peer_id
        self.start = start
        self.end = end
        self.max_length = max_length
        self.batch_size = batch_size
        self.pushers = list(pushers)  # servers that may push steps into this session (the previous hop)
        self.session_id = b""  # the server's capability id for this session, given at open
        self._outbox: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
        self._replies: AsyncIterator[pb.Frame] | None = None
        self._waiting: dict[int, asyncio.Future[pb.StepResult]] = {}  # by step id
        self._granted: asyncio.Future[None] | None = None
        self._failure: Exception | None = None  # why the stream is unusable, once it is
        self._reader: asyncio.Task | None = None
        self.max_tokens_per_step = DEFAULT_MAX_TOKENS_PER_REQUEST  # batch x new tokens; the server's own at open

    async def open(self) -> None:
        opening = pb.SessionOpen(
            span=pb.Span(start=self.start, end=self.end),
            max_length=self.max_length,
            batch_size=self.batch_size,
            response_codec=self.codecs.receive,
            adapter=self.adapter,
            pushers=self.pushers,
        )
        self._send(pb.InferenceRequest(open=opening))
        self._replies = await open_stream(self.p2p, self.peer_id, RPC_INFERENCE, self._requests(), CONNECT_TIMEOUT)
        reply = await self._receive(CONNECT_TIMEOUT)
        if reply.WhichOneof("response") != "opened":
            raise RemoteError(self.peer_id, f"expected `opened`, got {reply.WhichOneof('response')}")
        if reply.opened.max_tokens_per_request:  # 0: a server from before the field, with the default limit
            self.max_tokens_per_step = reply.opened.max_tokens_per_request
        self.session_id = reply.opened.session_id
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    async def step(
        self, hidden_states: torch.Tensor, position: int, padding_mask: torch.Tensor | None = None,
        reorder: torch.Tensor | None = None, step_id: int | None = None,
    ) -> torch.Tensor:
        """Send hidden states (batch, new_tokens, hidden) starting at `position`; get this span's output
        (same shape), in as many steps as the server's per-step token limit needs. `padding_mask`
        (batch, new_tokens), True for real tokens, marks pads among the new tokens; `reorder` (batch,)
        permutes the session's rows first (beam search); `step_id` repeats a step sent before (a replay)."""
        batch, new_tokens, _ = hidden_states.shape
        tokens_per_step = max(1, self.max_tokens_per_step // batch)
        outputs = []
        for offset in range(0, new_tokens, tokens_per_step):
            part = slice(offset, offset + tokens_per_step)
            mask = padding_mask[:, part] if padding_mask is not None else None
            first = offset == 0
            part_id = step_id if first and step_id is not None else next_step_id()
            reply = self.expect(part_id)
            self.send_step(hidden_states[:, part], position + offset, mask, reorder if first else None, part_id)
            outputs.append(self.output_of(await self.reply(reply), tuple(hidden_states[:, part].shape)))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def send_step(
        self, hidden_states: torch.Tensor, position: int, padding_mask: torch.Tensor | None, reorder: torch.Tensor | None,
        step_id: int, push_to: Sequence[pb.PushHop] = (),
    ) -> None:
        """Send one step without waiting; with `push_to`, the server pushes its output along that route."""
        step = pb.InferenceStep(hidden_states=encode(hidden_states, self.codecs.send), position=position, step_id=step_id,
                                attention_mask=encode_mask(padding_mask),
                                reorder=reorder.tolist() if reorder is not None else [], push_to=push_to)
        self._send(pb.InferenceRequest(step=step))

    def expect(self, step_id: int) -> asyncio.Future[pb.StepResult]:
        """A future for this session's reply to step `step_id` (its result, or the copy of a pushed step)."""
        future = asyncio.get_running_loop().create_future()
        if self._failure is not None:
            future.set_exception(self._failure)
        else:
            self._waiting[step_id] = future
        return future

    async def reply(self, future: asyncio.Future[pb.StepResult], timeout: float = STEP_TIMEOUT) -> pb.StepResult:
        """Wait for a reply from `expect`; a server that does not answer in time fails with PeerTimeout."""
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise PeerTimeout(self.peer_id, "inference step timed out") from None

    def output_of(self, result: pb.StepResult, shape: tuple[int, ...]) -> torch.Tensor:
        """The hidden states of a reply, checked to have exactly `shape` (batch, new_tokens, hidden)."""
        return decode_reply(self.peer_id, result.hidden_states, shape, "hidden states")

    async def grant(self, pushers: Sequence[str]) -> None:
        """Let `pushers` (and no one else) push steps into this session from now on, e.g. a replaced previous hop."""
        self.pushers = list(pushers)
        self._granted = asyncio.get_running_loop().create_future()
        if self._failure is not None:
            raise self._failure
        self._send(pb.InferenceRequest(grant=pb.PushGrant(pushers=self.pushers)))
        try:
            await asyncio.wait_for(asyncio.shield(self._granted), STEP_TIMEOUT)
        except TimeoutError:
            raise PeerTimeout(self.peer_id, "grant timed out") from None

    async def close(self) -> None:
        """End the stream; the server then frees the session's cache."""
        self._outbox.put_nowait(None)
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
            except TimeoutError:
                self._reader.cancel()
        elif self._replies is not None:
            await _drain(self._replies)

    def _send(self, message: pb.InferenceRequest) -> None:
        for frame in to_frames(message):
            self._outbox.put_nowait(frame)

    async def _requests(self) -> AsyncIterator[pb.Frame]:
        while (frame := await self._outbox.get()) is not None:
            yield frame

    async def _read_replies(self) -> None:
        """Hand every reply to its waiter until the stream ends or fails; then fail every waiter."""
        try:
            while True:
                reply = await self._receive(None)
                kind = reply.WhichOneof("response")
                if kind == "step":
                    future = self._waiting.pop(reply.step.step_id, None)
                    if future is not None and not future.done():
                        future.set_result(reply.step)
                elif kind == "granted" and self._granted is not None and not self._granted.done():
                    self._granted.set_result(None)
                else:
                    raise RemoteError(self.peer_id, f"unexpected `{kind}` in an inference session")
        except Exception as e:  # noqa: BLE001 - delivered to every waiter, who blames this server
            failure = e if isinstance(e, (RemoteError, InvalidRequest, CacheFull)) else RemoteError(self.peer_id, repr(e))
        self._failure = failure
        waiters: list[asyncio.Future] = [*self._waiting.values(), *([self._granted] if self._granted is not None else [])]
        for future in waiters:
            if not future.done():
                future.set_exception(failure)
                future.exception()  # retrieved: nobody may be waiting any more
        self._waiting.clear()

    async def _receive(self, timeout: float | None) -> pb.InferenceResponse:
        assert self._replies is not None, "open() first"
        with translate_errors(self.peer_id, "inference step"):
            reply = await asyncio.wait_for(read_message(self._replies, pb.InferenceResponse), timeout)
        if reply is None:
            raise RemoteError(self.peer_id, "the server closed the inference session")
        if reply.WhichOneof("response") == "error":
            raise_for_error(self.peer_id, reply.error)
        return reply


async def _drain(replies: AsyncIterator[pb.Frame]) -> None:
    try:
        async with asyncio.timeout(1.0):
            async for _ in replies:
                pass
    except Exception:  # the session is over either way; nothing to report
        pass
