"""Round trips from this server to the servers that can follow it in a chain (those holding its end block).

They are announced in the server's record, refreshed with it, and expire with it. Clients route
by their own round trips (hidden states return to the client between hops); these figures show
the swarm's shape on the health page and serve a future server-to-server push.
"""

from __future__ import annotations

import asyncio

from swarm.records import ServerRecord, ServerState
from swarm.transport import P2P, ping

PING_TIMEOUT = 2.0  # seconds; a server that does not answer in time is left out
MAX_PINGED = 8  # servers pinged per refresh


async def ping_next_servers(p2p: P2P, own_peer: str, next_block: dict[str, ServerRecord]) -> tuple[tuple[str, float], ...]:
    """Round trips to up to MAX_PINGED online servers of the block after this server's span."""
    peers = [peer for peer, record in next_block.items() if peer != own_peer and record.state == ServerState.ONLINE]
    results = await asyncio.gather(*(ping(p2p, peer, PING_TIMEOUT) for peer in peers[:MAX_PINGED]))
    return tuple(sorted((peer, rtt) for peer, rtt in zip(peers, results) if rtt is not None))
