"""Cutting messages into `Frame`s and putting them back together, with a size cap on the way in.

Every streamed RPC carries frames instead of its messages directly, so a long prompt's prefill or a
big training batch is never bound by the transport's message cap (hivemind unary calls stop at
4 MiB and an oversized reply hangs the caller: notes/hivemind.md §3).
"""

from __future__ import annotations

import asyncio

from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from swarm.errors import InvalidRequest
from swarm.limits import MAX_FRAME_BYTES, MAX_MESSAGE_BYTES
from swarm.wire import swarm_rpc_pb2 as pb

MessageT = TypeVar("MessageT", bound=Message)


def to_frames(message: Message, frame_bytes: int = MAX_FRAME_BYTES) -> Iterator[pb.Frame]:
    """Serialize `message` and yield it as one or more frames; the final one has `last` set."""
    payload = message.SerializeToString()
    if len(payload) <= frame_bytes:
        yield pb.Frame(payload=payload, last=True)
        return
    view = memoryview(payload)
    for offset in range(0, len(payload), frame_bytes):
        chunk = view[offset : offset + frame_bytes]
        yield pb.Frame(payload=bytes(chunk), last=offset + frame_bytes >= len(payload))


async def read_message(
    frames: AsyncIterator[pb.Frame], message_type: type[MessageT], max_bytes: int = MAX_MESSAGE_BYTES
) -> MessageT | None:
    """Read frames up to the next `last` one and parse them; None if the stream ended cleanly first."""
    parts: list[bytes] = []
    total = 0
    async for frame in frames:
        if not frame.payload and not frame.last:  # to_frames never sends one; a flood of them would cost CPU for free
            raise InvalidRequest("empty frame in the middle of a message")
        total += len(frame.payload)
        if total > max_bytes:
            raise InvalidRequest(f"message exceeds the limit of {max_bytes} bytes")
        parts.append(frame.payload)
        if frame.last:
            return parse_message(b"".join(parts), message_type)
    if parts:
        raise InvalidRequest("stream ended in the middle of a message")
    return None


async def read_until_end(frames: AsyncIterator[pb.Frame], timeout: float = 5.0) -> None:
    """Consume a request stream to its end before the handler returns (after it has replied).

    A handler that returns while the caller is still writing its end-of-stream marker makes
    hivemind close the stream under that write, and the caller then sees BrokenPipeError instead
    of the reply. Replying first and draining after lets a caller that keeps its side open (an
    inference session) see an error at once. Anything but the end here is dropped.
    """
    try:
        async with asyncio.timeout(timeout):
            async for _ in frames:
                pass
    except TimeoutError:
        pass


def parse_message(payload: bytes, message_type: type[MessageT]) -> MessageT:
    """Parse bytes into `message_type`, turning protobuf's decode failure into InvalidRequest."""
    message = message_type()
    try:
        message.ParseFromString(payload)
    except DecodeError as e:
        raise InvalidRequest(f"malformed {message_type.__name__}: {e}") from None
    return message
