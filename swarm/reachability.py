"""Can others dial this peer? A dial-back check, so that a server behind NAT knows to serve through a relay.

A starting server listens (on a short-lived peer with its own listening options) and asks its initial
peers, which are public by definition, to open a new direct connection to it. Each checker dials only
addresses at the IP address that the caller's own connection comes from, so that the check cannot be
used to make it dial third parties, and it runs few checks at a time.

libp2p's AutoNAT is not used for this: go-libp2p's AutoNAT servers do not dial back private addresses,
they need several peers to agree, and p2pd does not report the reachability they found.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Sequence

from swarm.errors import RemoteError
from swarm.transport import (
    P2P,
    P2PContext,
    call_unary,
    caller_of,
    connection_maddrs,
    dial_directly,
    listen_maddrs,
    start_p2p,
)
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.rpc import RPC_REACHABILITY

logger = logging.getLogger(__name__)

DIAL_BACK_TIMEOUT = 5.0  # seconds a checker waits for the direct connection; a dropped SYN costs all of it
CHECK_TIMEOUT = DIAL_BACK_TIMEOUT + 10.0  # seconds the caller waits: the checker starts a probe daemon (~0.3 s) first
MAX_CONCURRENT_CHECKS = 2  # per checker: each one starts a p2pd process
MAX_CHECKED_MADDRS = 8
MAX_MADDR_LENGTH = 256


async def serve_reachability_checks(p2p: P2P) -> None:
    """Answer other peers' dial-back checks on `p2p` (a public peer: the DHT bootstrap or a direct server)."""
    checks = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)
    await p2p.add_protobuf_handler(RPC_REACHABILITY, functools.partial(_check_caller, p2p, checks), pb.ReachabilityRequest)


async def _check_caller(
    p2p: P2P, checks: asyncio.Semaphore, request: pb.ReachabilityRequest, context: P2PContext
) -> pb.ReachabilityResponse:
    caller = caller_of(context)
    if checks.locked():
        return pb.ReachabilityResponse(error=f"busy: {MAX_CONCURRENT_CHECKS} checks in progress")
    async with checks:
        seen_from = {_ip_of(maddr) for maddr in await connection_maddrs(p2p, caller)} - {None}
        targets = [maddr for maddr in _valid_maddrs(request.maddrs) if _ip_of(maddr) in seen_from]
        if not targets:
            logger.debug("dial-back check for %s: no address at the IP it connects from (%s)", caller, seen_from)
            return pb.ReachabilityResponse(reachable=False)
        reachable = await dial_directly(caller, targets, DIAL_BACK_TIMEOUT)
        logger.debug("dial-back check for %s at %s: %s", caller, targets, "reachable" if reachable else "not reachable")
        return pb.ReachabilityResponse(reachable=reachable)


def _valid_maddrs(maddrs: Sequence[str]) -> list[str]:
    """The caller's addresses that are worth a dial: direct TCP ones, at most a few, each of bounded length."""
    return [
        maddr for maddr in maddrs[:MAX_CHECKED_MADDRS]
        if len(maddr) <= MAX_MADDR_LENGTH and "/tcp/" in maddr and "/p2p" not in maddr and _ip_of(maddr) is not None
    ]


def _ip_of(maddr: str) -> str | None:
    """The IP address of a multiaddr like /ip4/1.2.3.4/tcp/5 (None for DNS names, relays, anything else)."""
    parts = maddr.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[1] not in ("ip4", "ip6"):
        return None
    try:
        return str(ipaddress.ip_address(parts[2]))
    except ValueError:
        return None


async def check_reachability(initial_peers: Sequence[str], host_maddrs: Sequence[str], announce_maddrs: Sequence[str]) -> bool | None:
    """Whether peers can dial a server that listens on `host_maddrs`: asks every initial peer to dial back.

    True or False by the majority of the answers; None if no peer answered (they may predate the check).
    """
    p2p = await start_p2p(initial_peers, host_maddrs, announce_maddrs)
    try:
        maddrs = await listen_maddrs(p2p)
        checkers = sorted({maddr.rsplit("/p2p/", 1)[1] for maddr in initial_peers})
        answers = await asyncio.gather(*(_ask(p2p, checker, maddrs) for checker in checkers))
    finally:
        await p2p.shutdown()
    votes = [answer for answer in answers if answer is not None]
    logger.info("dial-back check: %d of %d peers reached %s directly (%d did not answer)",
                sum(votes), len(votes), " ".join(maddrs), len(answers) - len(votes))
    return sum(votes) * 2 > len(votes) if votes else None


async def _ask(p2p: P2P, checker: str, maddrs: list[str]) -> bool | None:
    try:
        response = await call_unary(p2p, checker, RPC_REACHABILITY, pb.ReachabilityRequest(maddrs=maddrs),
                                    pb.ReachabilityResponse, CHECK_TIMEOUT)
    except RemoteError as e:  # PeerTimeout included
        logger.debug("peer %s did not check reachability: %s", checker, e)
        return None
    if response.error:
        logger.debug("peer %s did not check reachability: %s", checker, response.error[:MAX_MADDR_LENGTH])
        return None
    return response.reachable
