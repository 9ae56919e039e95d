"""One inference stream to one server for one hop of the route: open, steps, close.

The server says at `open` how many tokens (batch x new tokens) one step may carry; a longer step
(a long prompt's prefill, a failover's replay) is sent as consecutive steps within that limit.
Every reply is checked (shape, decodability, finite values) before it is used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import torch
from swarm.errors import RemoteError
from swarm.limits import CONNECT_TIMEOUT, DEFAULT_MAX_TOKENS_PER_REQUEST, STEP_TIMEOUT
from swarm.transport import P2P, open_stream, raise_for_error, translate_errors
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.frames import read_message, to_frames
from swarm.wire.codecs import encode, encode_mask
from swarm.wire.rpc import RPC_INFERENCE
from swarm.client.reply_checks import decode_reply
from swarm.client.wire_codecs import WireCodecs

logger = logging.getLogger(__name__)


class SpanSession:
    """A server-side inference session over blocks [start, end) of one peer."""

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
    ):
        self.p2p = p2p
        self.codecs = codecs
        self.adapter = adapter
        self.peer_id = peer_id
        self.start = start
        self.end = end
        self.max_length = max_length
        self.batch_size = batch_size
        self._outbox: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
        self._replies: AsyncIterator[pb.Frame] | None = None
        self._step_id = 0
        self.max_tokens_per_step = DEFAULT_MAX_TOKENS_PER_REQUEST  # batch x new tokens; the server's own at open

    async def open(self) -> None:
        opening = pb.SessionOpen(
            span=pb.Span(start=self.start, end=self.end),
            max_length=self.max_length,
            batch_size=self.batch_size,
            response_codec=self.codecs.receive,
            adapter=self.adapter,
        )
        self._send(pb.InferenceRequest(open=opening))
        self._replies = await open_stream(self.p2p, self.peer_id, RPC_INFERENCE, self._requests(), CONNECT_TIMEOUT)
        reply = await self._receive(CONNECT_TIMEOUT)
        if reply.WhichOneof("response") != "opened":
            raise RemoteError(self.peer_id, f"expected `opened`, got {reply.WhichOneof('response')}")
        if reply.opened.max_tokens_per_request:  # 0: a server from before the field, with the default limit
            self.max_tokens_per_step = reply.opened.max_tokens_per_request

    async def step(
        self, hidden_states: torch.Tensor, position: int, padding_mask: torch.Tensor | None = None,
        reorder: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Send hidden states (batch, new_tokens, hidden) starting at `position`; get this span's output
        (same shape), in as many steps as the server's per-step token limit needs. `padding_mask`
        (batch, new_tokens), True for real tokens, marks pads among the new tokens; `reorder` (batch,)
        permutes the session's rows first (beam search)."""
        batch, new_tokens, _ = hidden_states.shape
        tokens_per_step = max(1, self.max_tokens_per_step // batch)
        outputs = []
        for offset in range(0, new_tokens, tokens_per_step):
            part = slice(offset, offset + tokens_per_step)
            mask = padding_mask[:, part] if padding_mask is not None else None
            outputs.append(await self._step(hidden_states[:, part], position + offset, mask, reorder if offset == 0 else None))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def _step(
        self, hidden_states: torch.Tensor, position: int, padding_mask: torch.Tensor | None, reorder: torch.Tensor | None
    ) -> torch.Tensor:
        self._step_id += 1
        step = pb.InferenceStep(hidden_states=encode(hidden_states, self.codecs.send), position=position, step_id=self._step_id,
                                attention_mask=encode_mask(padding_mask),
                                reorder=reorder.tolist() if reorder is not None else [])
        self._send(pb.InferenceRequest(step=step))
        reply = await self._receive(STEP_TIMEOUT)
        if reply.WhichOneof("response") != "step" or reply.step.step_id != self._step_id:
            raise RemoteError(self.peer_id, "the server answered out of order")
        return decode_reply(self.peer_id, reply.step.hidden_states, tuple(hidden_states.shape), "hidden states")

    async def close(self) -> None:
        """End the stream; the server then frees the session's cache."""
        self._outbox.put_nowait(None)
        if self._replies is not None:
            await _drain(self._replies)

    def _send(self, message: pb.InferenceRequest) -> None:
        for frame in to_frames(message):
            self._outbox.put_nowait(frame)

    async def _requests(self) -> AsyncIterator[pb.Frame]:
        while (frame := await self._outbox.get()) is not None:
            yield frame

    async def _receive(self, timeout: float) -> pb.InferenceResponse:
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
