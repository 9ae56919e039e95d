"""Per-peer admission: how many inference sessions and stateless requests one peer may hold at once.

A server serves strangers, so no single peer may take all of it: each open session and each
forward/backward in progress counts against its peer, and one over the limit is refused at once
with an error that names the limit (the caller's problem, so it never costs this server a ban).
Other peers are unaffected. The caller's identity is its libp2p peer id, which the transport
authenticates; a peer that makes many identities is bounded by the server's global budgets instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Iterator

from swarm.errors import LimitExceeded


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeerLimits:
    max_sessions_per_peer: int  # inference sessions open at once
    max_requests_per_peer: int  # forward and backward requests in progress at once


class PeerGovernor:
    """Counts what each peer holds; `session()` and `request()` admit or refuse."""

    def __init__(self, limits: PeerLimits):
        self.limits = limits
        self._sessions: Counter[str] = Counter()
        self._requests: Counter[str] = Counter()

    @contextlib.contextmanager
    def session(self, peer: str) -> Iterator[None]:
        with _admitted(self._sessions, peer, self.limits.max_sessions_per_peer, "inference sessions", "--max-sessions-per-peer"):
            yield

    @contextlib.contextmanager
    def request(self, peer: str) -> Iterator[None]:
        with _admitted(self._requests, peer, self.limits.max_requests_per_peer, "requests in progress", "--max-requests-per-peer"):
            yield

    def held_by(self, peer: str) -> tuple[int, int]:
        """(sessions, requests) that `peer` holds now."""
        return self._sessions[peer], self._requests[peer]


@contextlib.contextmanager
def _admitted(counts: Counter[str], peer: str, limit: int, what: str, flag: str) -> Iterator[None]:
    if counts[peer] >= limit:
        raise LimitExceeded(f"this peer already has {counts[peer]} {what} on this server (limit {limit}, {flag})")
    counts[peer] += 1
    try:
        yield
    finally:
        counts[peer] -= 1
        if not counts[peer]:
            del counts[peer]
