"""The client's connection to one model in the swarm: DHT membership, records, pings and routes."""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from swarm import dht as swarm_dht
from swarm.errors import MissingBlocksError
from swarm.limits import ROUTE_WAIT
from swarm.records import ServerRecord
from swarm.transport import P2P, ping
from swarm.client.event_loop import run_sync
from swarm.client.retry import BanList, RetryPolicy
from swarm.client.wire_codecs import WireCodecs
from swarm.client.routing import RouteHop, ServerFilter, batch_capacity, forward_route, inference_route

if TYPE_CHECKING:
    from swarm.client.spot_checks import SpotChecker

logger = logging.getLogger(__name__)

ROUTE_RETRY_PERIOD = 1.0  # seconds between DHT reads while waiting for missing blocks
PING_TIMEOUT = 2.0  # seconds; a server slower than this to answer counts as this slow
PING_MAX_AGE = 60.0  # seconds a round-trip measurement stays valid


class SwarmClient:
    """Joins the DHT as a client and talks to the servers of one model (`dht_prefix`)."""

    def __init__(
        self,
        initial_peers: list[str],
        dht_prefix: str,
        num_blocks: int,
        *,
        route_wait: float = ROUTE_WAIT,
        allowed_servers: list[str] | None = None,
        blocked_servers: list[str] = (),
        retry_policy: RetryPolicy = RetryPolicy(),
        codecs: WireCodecs = WireCodecs(),
        push: bool = True,
    ):
        self.initial_peers = initial_peers
        self.dht_prefix = dht_prefix
        self.num_blocks = num_blocks
        self.route_wait = route_wait
        self.allowed_servers = frozenset(allowed_servers) if allowed_servers is not None else None
        self.blocked_servers = frozenset(blocked_servers)
        self.bans = BanList(retry_policy)
        self.codecs = codecs
        self.push = push  # inference steps go server to server (routes chosen for it), or back through the client
        self.in_flight: Counter[str] = Counter()  # this client's requests running on each server
        self._rtt: dict[str, tuple[float, float]] = {}  # peer -> (seconds, measured at)
        self.dht = None
        self.p2p: P2P | None = None
        self.spot_checker: SpotChecker | None = None  # set by from_pretrained(verify_fraction=...)

    def start(self) -> None:
        """Join the DHT as a client (once: a client that fetched its model's files first has joined already)."""
        if self.dht is not None:
            return
        self.dht = swarm_dht.start_dht(self.initial_peers, client_mode=True)
        self.p2p = run_sync(self.dht.replicate_p2p())
        atexit.register(self.shutdown)  # a script that never calls shutdown() still leaves cleanly

    def shutdown(self) -> None:
        """Leave the swarm: close this client's connection to p2pd, then stop its DHT peer."""
        if self.p2p is not None:
            run_sync(_close_p2p(self.p2p))
            self.p2p = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    def server_filter(
        self, min_cache_tokens: int = 0, exclude: frozenset[str] = frozenset(), min_request_tokens: int = 0
    ) -> ServerFilter:
        codecs = frozenset({self.codecs.send, self.codecs.receive})
        return ServerFilter(self.allowed_servers, self.blocked_servers, self.bans.banned() | exclude, min_cache_tokens, codecs,
                            min_request_tokens)

    async def fetch_blocks(self) -> list[dict[str, ServerRecord]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, swarm_dht.fetch_block_records, self.dht, self.dht_prefix, self.num_blocks)

    async def inference_route(self, start: int, end: int, min_cache_tokens: int, adapter: str = "") -> list[RouteHop]:
        """The fastest chain over [start, end) for decoding, waiting up to `route_wait` s for missing blocks
        (`adapter`: the hash of a held adapter the session names; its holders are preferred)."""

        async def plan(blocks: list[dict[str, ServerRecord]]) -> list[RouteHop]:
            servers = self.server_filter(min_cache_tokens)
            candidates = {peer for records in blocks[start:end] for peer, record in records.items() if servers.usable(peer, record)}
            await self.measure_rtt(candidates)
            return inference_route(blocks, start, end, self.dht_prefix, servers, self.rtt(), push=self.push, adapter=adapter)

        return await self._route_when_covered(plan, "inference")

    async def forward_route(
        self, start: int, end: int, tokens: int, exclude: frozenset[str] = frozenset(), wait: bool = True, adapter: str = ""
    ) -> list[RouteHop]:
        """A route for a stateless call of `tokens` (batch x sequence) over [start, end), on servers that
        take that many, avoiding `exclude` too. Without `wait`, missing blocks raise MissingBlocksError
        at once (and no banned server gets a second chance)."""

        async def plan(blocks: list[dict[str, ServerRecord]]) -> list[RouteHop]:
            servers = self.server_filter(exclude=exclude, min_request_tokens=tokens)
            return forward_route(blocks, start, end, self.dht_prefix, servers, self.in_flight, adapter=adapter)

        if not wait:
            return await plan(await self.fetch_blocks())
        return await self._route_when_covered(plan, "forward")

    async def batch_capacity(self) -> tuple[int, int]:
        """(tokens per request, replicas) for splitting a stateless batch, from one DHT read (routing.batch_capacity)."""
        return batch_capacity(await self.fetch_blocks(), self.server_filter())

    async def _route_when_covered(self, plan, kind: str) -> list[RouteHop]:  # noqa: ANN001
        deadline = time.monotonic() + self.route_wait
        while True:
            blocks = await self.fetch_blocks()
            try:
                route = await plan(blocks)
            except MissingBlocksError as e:
                holders = {peer for start, end in e.missing for records in blocks[start:end] for peer in records}
                if self.bans.release_oldest(holders) is not None:
                    continue  # banned servers are better than none: try again with one back
                if time.monotonic() >= deadline:
                    raise
                logger.debug("waiting for blocks: %s", e)
                await asyncio.sleep(ROUTE_RETRY_PERIOD)
                continue
            logger.info("%s route: %s", kind, " -> ".join(f"{hop.peer_id[-6:]}[{hop.start}:{hop.end}]" for hop in route))
            return route

    def rtt(self) -> dict[str, float]:
        now = time.monotonic()
        return {peer: seconds for peer, (seconds, at) in self._rtt.items() if now - at < PING_MAX_AGE}

    async def measure_rtt(self, peers: set[str]) -> None:
        """Ping the peers whose round-trip time is unknown or stale, all at once."""
        known = self.rtt()
        stale = [peer for peer in peers if peer not in known]
        if stale:
            await asyncio.gather(*(self._ping(peer) for peer in stale))

    async def _ping(self, peer: str) -> None:
        """Measure a round trip; a server that does not answer at all is banned like one that failed a
        request, so that a dead server whose record has not expired yet is not chosen (and dialled) again."""
        seconds = await ping(self.p2p, peer, PING_TIMEOUT)
        self._rtt[peer] = (seconds if seconds is not None else PING_TIMEOUT, time.monotonic())
        if seconds is None:
            self.bans.ban(peer)


async def _close_p2p(p2p: P2P) -> None:
    await p2p.shutdown()
    await asyncio.sleep(0)  # let the cancelled connection tasks finish inside this loop
