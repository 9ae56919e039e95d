"""The attention-cache budget: how many tokens of KV cache all open sessions may hold together.

A session reserves `batch_size * max_length` tokens when it opens and gives them back when it
closes. An open that does not fit waits a bounded time for room, then is refused with CacheFull.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from swarm.errors import CacheFull


class CacheBudget:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._reserved = 0
        self._changed: asyncio.Condition | None = None  # made lazily, inside the server's event loop

    @property
    def tokens_left(self) -> int:
        return self.max_tokens - self._reserved

    @contextlib.asynccontextmanager
    async def reserve(self, tokens: int, timeout: float) -> AsyncIterator[None]:
        """Hold `tokens` of cache for the duration of the block; wait up to `timeout` s for room."""
        if tokens > self.max_tokens:
            raise CacheFull(f"a session of {tokens} tokens exceeds this server's whole cache of {self.max_tokens} tokens")
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.tokens_left >= tokens), timeout)
            except TimeoutError:
                raise CacheFull(
                    f"no cache room for {tokens} tokens within {timeout:.0f} s ({self.tokens_left} of {self.max_tokens} left)"
                ) from None
            self._reserved += tokens
        try:
            yield
        finally:
            async with self._changed:
                self._reserved -= tokens
                self._changed.notify_all()
