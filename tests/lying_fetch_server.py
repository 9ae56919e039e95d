"""A swarm-server whose tensor bytes over swarm.fetch are wrong (SWARM_TEST_LIE=corrupt: one byte of
every chunk flipped) or stop halfway (SWARM_TEST_LIE=truncate: half of the first chunk, then the
stream ends, as a peer that disconnects mid-download). Its manifest, config and computations are
honest. Run as `python -m tests.lying_fetch_server MODEL --blocks A:B ...` (swarm-server's arguments).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from swarm.server import cli
from swarm.server.fetch_service import FetchService

_honest_chunks = FetchService._tensor_chunks


async def _lying_chunks(self: FetchService, name: str, offset: int, length: int) -> AsyncIterator[bytes]:
    async for data in _honest_chunks(self, name, offset, length):
        if os.environ["SWARM_TEST_LIE"] == "corrupt":
            yield bytes([data[0] ^ 0xFF]) + data[1:]
        else:
            yield data[: max(1, len(data) // 2)]
            return


if __name__ == "__main__":
    FetchService._tensor_chunks = _lying_chunks  # type: ignore[method-assign]
    cli.main()
