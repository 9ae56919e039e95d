"""Calling a peer's RPCs over hivemind P2P, with hivemind's and asyncio's errors turned into ours.

Every call is bounded by a timeout: several hivemind failure modes hang instead of raising
(notes/hivemind.md, trap 14).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

from google.protobuf.message import Message
from hivemind.p2p import P2P, P2PContext, PeerID  # P2P is re-exported: the sides name the type from here
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.utils.multiaddr import Multiaddr

from swarm.errors import CacheFull, ConfigError, InvalidRequest, PeerTimeout, RemoteError, SwarmError
from swarm.limits import MAX_MESSAGE_BYTES
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.frames import read_message, to_frames
from swarm.wire.rpc import RPC_INFO

MessageT = TypeVar("MessageT", bound=Message)

_TRANSPORT_ERRORS = (P2PDaemonError, P2PHandlerError, ConnectionError, EOFError, OSError)


def peer_from_base58(peer_id: str) -> PeerID:
    return PeerID.from_base58(peer_id)


def caller_of(context: P2PContext) -> str:
    """The base58 peer id of whoever called a handler."""
    return context.remote_id.to_base58()


async def start_p2p(initial_peers: Sequence[str], host_maddrs: Sequence[str], announce_maddrs: Sequence[str] = ()) -> P2P:
    """A short-lived P2P peer without a DHT that listens like a server would (for a reachability check).

    ConfigError if none of the initial peers answers, as when starting the DHT peer.
    """
    try:
        return await P2P.create(
            initial_peers=list(initial_peers), host_maddrs=list(host_maddrs), announce_maddrs=list(announce_maddrs) or None,
            dht_mode="client", use_relay=False, auto_nat=False, nat_port_map=False,
        )
    except P2PDaemonError as e:
        if "bootstrap" in str(e):
            raise ConfigError(f"none of the initial peers answered: {', '.join(initial_peers)}") from None
        raise SwarmError(f"could not start a P2P peer: {str(e).strip().splitlines()[0]}") from None


async def listen_maddrs(p2p: P2P) -> list[str]:
    """The addresses `p2p` tells others to dial, without the /p2p/ID suffix (empty if it has none)."""
    try:
        maddrs = await p2p.get_visible_maddrs(latest=True)
    except ValueError:  # hivemind raises it when the daemon reports no address
        return []
    return [str(maddr.decapsulate(Multiaddr(f"/p2p/{p2p.peer_id.to_base58()}"))) for maddr in maddrs]


async def connection_maddrs(p2p: P2P, peer_id: str) -> list[str]:
    """The remote addresses of `p2p`'s open connections to the peer (as p2pd's ListPeers reports them)."""
    return [str(addr) for info in await p2p.list_peers() if info.peer_id.to_base58() == peer_id for addr in info.addrs]


async def dial_directly(peer_id: str, maddrs: Sequence[str], timeout: float) -> bool:
    """Whether a fresh peer that cannot use relays connects to `peer_id` at one of `maddrs` within `timeout` s.

    A fresh peer, because the caller's own daemon already holds a connection (maybe relayed) to that
    peer and would reuse it. libp2p's handshake checks that whoever answers is `peer_id`.
    """
    probe = await P2P.create(dht_mode="client", use_relay=False, auto_nat=False, nat_port_map=False, no_listen=True)
    try:
        # hivemind's P2P has no public connect(); its daemon client has (p2pclient.py:79).
        await asyncio.wait_for(probe._client.connect(peer_from_base58(peer_id), [Multiaddr(m) for m in maddrs]), timeout)
        return True
    except (TimeoutError, *_TRANSPORT_ERRORS):
        return False
    finally:
        await probe.shutdown()


@contextlib.contextmanager
def translate_errors(peer_id: str, what: str):  # noqa: ANN201 (a context manager)
    """Turn transport failures inside the block into RemoteError / PeerTimeout naming the peer."""
    try:
        yield
    except TimeoutError:
        raise PeerTimeout(peer_id, f"{what} timed out") from None
    except _TRANSPORT_ERRORS as e:
        raise RemoteError(peer_id, f"{what} failed: {type(e).__name__}: {e}") from None


async def call_unary(
    p2p: P2P, peer_id: str, name: str, request: Message, response_type: type[MessageT], timeout: float
) -> MessageT:
    with translate_errors(peer_id, name):
        return await asyncio.wait_for(
            p2p.call_protobuf_handler(peer_from_base58(peer_id), name, request, response_type), timeout
        )


async def open_stream(p2p: P2P, peer_id: str, name: str, requests: AsyncIterator[pb.Frame], timeout: float) -> AsyncIterator[pb.Frame]:
    """Open a stream of frames to `name` on the peer; iterate the result inside `translate_errors`."""
    with translate_errors(peer_id, name):
        return await asyncio.wait_for(p2p.iterate_protobuf_handler(peer_from_base58(peer_id), name, requests, pb.Frame), timeout)


async def call_stream(
    p2p: P2P, peer_id: str, name: str, request: Message, response_type: type[MessageT], open_timeout: float,
    reply_timeout: float, max_bytes: int = MAX_MESSAGE_BYTES,
) -> MessageT:
    """Send `request` on a new stream of `name` and return the one reply (an error reply included).

    A stream that ends before any reply is opened once more: under load hivemind's daemons now and
    then drop a reply the server did compute and send (in stress runs of tests/test_bad_input.py on
    a busy 2-core machine, about one stream in 700 ended cleanly with no bytes while the server's
    forward counter rose). A second silent stream is RemoteError. The reply is not checked here.
    """
    for _ in range(2):
        replies = await open_stream(p2p, peer_id, name, _frames_of(request), open_timeout)
        with translate_errors(peer_id, name):
            reply = await asyncio.wait_for(read_message(replies, response_type, max_bytes), reply_timeout)
        if reply is not None:
            return reply
    raise RemoteError(peer_id, f"closed the {name} stream twice without a reply")


async def _frames_of(message: Message) -> AsyncIterator[pb.Frame]:
    for frame in to_frames(message):
        yield frame


def raise_for_error(peer_id: str, error: pb.Error) -> None:
    """Raise the client-side error that a server's `Error` reply stands for."""
    if error.kind == pb.Error.INVALID_REQUEST:
        raise InvalidRequest(f"server {peer_id[-8:]} rejected the request: {error.message}")
    if error.kind == pb.Error.SPAN_NOT_SERVED:
        raise RemoteError(peer_id, error.message)
    if error.kind == pb.Error.CACHE_FULL:
        raise CacheFull(f"server {peer_id[-8:]}: {error.message}")
    raise RemoteError(peer_id, error.message)


async def ping(p2p: P2P, peer_id: str, timeout: float) -> float | None:
    """Seconds an `info` call to the peer takes (our ping: hivemind's P2P has none), or None if it fails."""
    began = time.perf_counter()
    try:
        await call_unary(p2p, peer_id, RPC_INFO, pb.InfoRequest(), pb.InfoResponse, timeout)
    except RemoteError:
        return None
    return time.perf_counter() - began
