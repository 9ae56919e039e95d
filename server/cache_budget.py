"""The attention-cache budget, in bytes: everything that all open sessions hold together.

A session reserves, when it opens, the keys and values of `batch_size * max_length` tokens over its
blocks (bytes per token from the model's shape and dtype, `SpanRunner.kv_bytes_per_token`) plus
the adapter tensors it keeps for its lifetime, and gives them back when it closes. The session's
cache (server/kv_cache.py SessionCache) allocates exactly those keys and values when it opens. An open that
does not fit waits a bounded time for room, then is refused with CacheFull naming the sizes.
The operator sizes it in tokens of the whole span (`--attn-cache-tokens`), which is what servers
announce; the bytes are what is enforced, so a session with a large adapter costs what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from swarm.errors import CacheFull


class CacheBudget:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._reserved = 0
        self._changed: asyncio.Condition | None = None  # made lazily, inside the server's event loop

    @property
    def bytes_left(self) -> int:
        return self.max_bytes - self._reserved

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int, timeout: float, what: str) -> AsyncIterator[None]:
        """Hold `nbytes` (described by `what`) for the duration of the block; wait up to `timeout` s for room."""
        if nbytes > self.max_bytes:
            raise CacheFull(f"{what} needs {_mib(nbytes)}, more than this server's whole cache of {_mib(self.max_bytes)}")
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.bytes_left >= nbytes), timeout)
            except TimeoutError:
                raise CacheFull(
                    f"no cache room for {what} ({_mib(nbytes)}) within {timeout:.0f} s "
                    f"({_mib(self.bytes_left)} of {_mib(self.max_bytes)} left)"
                ) from None
            self._reserved += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self._reserved -= nbytes
                self._changed.notify_all()


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"
