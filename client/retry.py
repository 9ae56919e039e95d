"""The one retry policy of the client: bounded attempts, and bans with exponential backoff.

Every retry decision of the client is made here. Forward, backward and opening a chain go through
`with_rerouting`, an inference step's hop-by-hop loop and the backward fallback count their
failures with `Attempts`, and a broken connection is retried once at once (`with_transport_retry`):
a server that fails (connection lost, timeout, error reply) is banned for a while and the attempt
is made again on a route that avoids it. A caller's own mistake (InvalidRequest) is never blamed
on a server, and missing blocks end the retries at once with MissingBlocksError.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from swarm.errors import CacheFull, RemoteError, RoutingError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 5  # attempts per request, the first one included
    ban_time: float = 15.0  # seconds a failed server is avoided after its first failure
    max_ban_time: float = 300.0  # seconds; each further failure doubles the ban up to this
    transport_retries: int = 1  # a call whose connection broke is made again at once this many times


class BanList:
    """Servers to avoid for now, each with its own backoff.

    The backoff doubles with each failure and resets when the server next serves a request, or
    when it has not failed for `max_ban_time`: a server that failed once yesterday starts afresh.
    """

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self._until: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._failed_at: dict[str, float] = {}
        self._liars: set[str] = set()  # banned for good: success never clears them, nor does the last resort

    def ban(self, peer_id: str) -> None:
        now = time.monotonic()
        recent = now - self._failed_at.get(peer_id, -math.inf) < self.policy.ban_time + self.policy.max_ban_time
        failures = self._failures.get(peer_id, 0) + 1 if recent else 1
        self._failures[peer_id] = failures
        self._failed_at[peer_id] = now
        duration = min(self.policy.ban_time * 2 ** (failures - 1), self.policy.max_ban_time)
        self._until[peer_id] = max(self._until.get(peer_id, 0.0), now + duration)  # never shortens a ban
        logger.info("avoiding server %s for %.0f s (failure %d)", peer_id[-8:], duration, failures)

    def ban_forever(self, peer_id: str) -> None:
        """A server caught returning wrong results: never used again by this client."""
        self._until[peer_id] = math.inf
        self._failed_at[peer_id] = time.monotonic()
        self._failures[peer_id] = self._failures.get(peer_id, 0) + 1
        self._liars.add(peer_id)

    def succeeded(self, peer_id: str) -> None:
        """The server served a request: forget its failures."""
        if peer_id not in self._liars and self._failures.pop(peer_id, None) is not None:
            self._until.pop(peer_id, None)
            self._failed_at.pop(peer_id, None)

    def banned(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(peer for peer, until in self._until.items() if until > now)

    def release_oldest(self, peers: Iterable[str]) -> str | None:
        """Lift the ban of the banned server among `peers` that failed longest ago, if that was at
        least `ban_time` ago: a last resort when every server of some blocks is banned, so that a
        block's only server is not lost for the whole (doubled) ban. None if there is no such server."""
        now = time.monotonic()
        banned = [
            peer for peer in self.banned().intersection(peers)
            if peer not in self._liars and now - self._failed_at[peer] >= self.policy.ban_time
        ]
        if not banned:
            return None
        oldest = min(banned, key=lambda peer: self._failed_at[peer])
        del self._until[oldest]
        logger.info("every server of some blocks is banned; trying %s again, which failed longest ago", oldest[-8:])
        return oldest


class Attempts:
    """One request's failures, counted against the policy: each bans the server to blame, and the
    last allowed one ends the request with RoutingError. Every retry of the client goes through one."""

    def __init__(self, bans: BanList, what: str):
        self.bans = bans
        self.what = what
        self.errors: list[str] = []

    def failed(self, peer_id: str, error: Exception) -> None:
        """Ban `peer_id` for `error`; RoutingError if that was the last attempt."""
        self.bans.ban(peer_id)
        self.errors.append(str(error))
        if len(self.errors) >= self.bans.policy.max_attempts:
            raise RoutingError(f"{self.what} failed {len(self.errors)} times; last error: {error}") from error
        logger.warning("%s failed on server %s: %s; rerouting", self.what, peer_id[-8:], error)


async def with_rerouting(attempt: Callable[[], Awaitable[T]], bans: BanList, what: str, attempts: Attempts | None = None) -> T:
    """Run `attempt` until it succeeds, banning the server behind each RemoteError/CacheFull.

    `attempt` must build its route afresh (avoiding `bans.banned()`) every time it is called.
    `attempts`: the request's failures so far, if it has failed elsewhere already (they count too).
    """
    attempts = attempts or Attempts(bans, what)
    while True:
        try:
            return await attempt()
        except ServerFailure as failure:
            attempts.failed(failure.peer_id, failure.error)


async def with_transport_retry(call: Callable[[], Awaitable[T]], policy: RetryPolicy) -> T:
    """`call`, made again at once (up to `policy.transport_retries` times) if its connection broke: a
    transient transport error on a healthy server should not cost a ban and a reroute."""
    for retry in range(policy.transport_retries + 1):
        try:
            return await call()
        except TransportFailure:
            if retry == policy.transport_retries:
                raise
    raise AssertionError("unreachable")


class TransportFailure(RemoteError):
    """The connection failed (as opposed to the server answering with an error)."""


class ServerFailure(Exception):
    """A server-side failure tagged with the server to blame (raised inside attempts)."""

    def __init__(self, peer_id: str, error: Exception):
        super().__init__(str(error))
        self.peer_id = peer_id
        self.error = error


BLAMABLE = (RemoteError, CacheFull)  # errors that say a server failed, not the caller
