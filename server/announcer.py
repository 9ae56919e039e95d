"""Keeps this server's record in the DHT: at once on every state change, and refreshed periodically."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

import hivemind

from swarm.dht import declare_span
from swarm.limits import RECORD_EXPIRATION, RECORD_REFRESH_PERIOD
from swarm.records import ModelRecord, ServerRecord, ServerState

logger = logging.getLogger(__name__)


class Announcer:
    def __init__(
        self,
        dht: hivemind.DHT,
        dht_prefix: str,
        record: ServerRecord,
        model: ModelRecord,
        cache_tokens_left: Callable[[], int],
        refresh_period: float = RECORD_REFRESH_PERIOD,
    ):
        self.dht = dht
        self.dht_prefix = dht_prefix
        self.record = record
        self.model = model
        self.cache_tokens_left = cache_tokens_left
        self.refresh_period = refresh_period

    def announce(self, state: ServerState) -> None:
        """Publish the record with `state` now (blocking: a DHT round trip)."""
        self.record = dataclasses.replace(self.record, state=state, cache_tokens_left=self.cache_tokens_left())
        expiration = RECORD_EXPIRATION if state != ServerState.OFFLINE else self.refresh_period
        declare_span(self.dht, self.dht_prefix, self.record, self.model, expiration)
        logger.debug("announced %s for blocks %d:%d", state.value, self.record.start, self.record.end)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh the online record every refresh period until `stop` is set."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.refresh_period)
            except TimeoutError:
                try:
                    await loop.run_in_executor(None, self.announce, ServerState.ONLINE)
                except Exception as e:  # a missed refresh is retried next period; the record outlives one
                    logger.warning("could not refresh the DHT record: %s", e)
