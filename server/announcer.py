"""Keeps this server's record in the DHT: at once on every state change, and refreshed periodically."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from swarm.dht import DHT, declare_span, fetch_records_at
from swarm.transport import P2P
from swarm.limits import RECORD_EXPIRATION, RECORD_REFRESH_PERIOD
from swarm.records import ModelRecord, RecordSigner, ServerRecord, ServerState
from swarm.server.peer_pings import ping_next_servers

logger = logging.getLogger(__name__)


class Announcer:
    def __init__(
        self,
        dht: DHT,
        signer: RecordSigner,
        dht_prefix: str,
        record: ServerRecord,
        model: ModelRecord,
        cache_tokens_left: Callable[[], int],
        refresh_period: float = RECORD_REFRESH_PERIOD,
        adapters: Callable[[], tuple[str, ...]] = tuple,
    ):
        self.dht = dht
        self.signer = signer
        self.dht_prefix = dht_prefix
        self.record = record
        self.model = model
        self.cache_tokens_left = cache_tokens_left
        self.refresh_period = refresh_period
        self.adapters = adapters  # hashes of the adapters this server holds (adapter_store.py)

    def announce(self, state: ServerState) -> None:
        """Publish the record with `state` now (blocking: a DHT round trip)."""
        self.record = dataclasses.replace(self.record, state=state, cache_tokens_left=self.cache_tokens_left(),
                                          adapters=self.adapters())
        # Offline records expire like online ones: the DHT keeps whichever expires later, so a shorter
        # expiration would lose to the online record it must replace.
        declare_span(self.dht, self.signer, self.dht_prefix, self.record, self.model, RECORD_EXPIRATION)
        logger.debug("announced %s for blocks %d:%d", state.value, self.record.start, self.record.end)

    def move(self, start: int, end: int) -> None:
        """Announce the new span online, then the blocks of the old one that it leaves as offline."""
        old = self.record
        self.record = dataclasses.replace(old, start=start, end=end)
        self.announce(ServerState.ONLINE)
        left = range(old.start, old.end)
        left_behind = range(left.start, start) if left.start < start else range(max(end, left.start), left.stop)
        if len(left_behind):
            offline = dataclasses.replace(old, state=ServerState.OFFLINE)
            declare_span(self.dht, self.signer, self.dht_prefix, offline, self.model, RECORD_EXPIRATION, blocks=left_behind)

    async def run(self, stop: asyncio.Event, p2p: P2P, peer_id: str) -> None:
        """Refresh the online record (with fresh pings to the next servers) every period until `stop` is set."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.refresh_period)
            except TimeoutError:
                # Separate attempts: failing to read the next servers (however their records look) must
                # never keep this server from refreshing its own record; it then announces no pings.
                try:
                    await self._measure_next_pings(p2p, peer_id)
                except Exception as e:  # noqa: BLE001 - pings are optional figures; the refresh is not
                    logger.warning("could not measure pings to the next servers: %s", e)
                    self.record = dataclasses.replace(self.record, next_pings=())
                try:
                    await loop.run_in_executor(None, self.announce, ServerState.ONLINE)
                except Exception as e:  # noqa: BLE001 - a missed refresh is retried next period; the record outlives one
                    logger.warning("could not refresh the DHT record: %s", e)

    async def _measure_next_pings(self, p2p: P2P, peer_id: str) -> None:
        end = self.record.end
        pings: tuple[tuple[str, float], ...] = ()
        if end < self.model.num_blocks:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(None, fetch_records_at, self.dht, self.dht_prefix, [end])
            pings = await ping_next_servers(p2p, peer_id, found[end])
        self.record = dataclasses.replace(self.record, next_pings=pings)
