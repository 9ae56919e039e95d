"""hivemind behind a door: starting a DHT peer, and storing and reading Swarm's records.

The rest of Swarm gets DHT handles, peer ids as base58 strings and our own errors from here.
Functions passed to `DHT.run_coroutine` are module-level because hivemind pickles them by
reference (notes/hivemind.md §1).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hivemind
import hivemind.dht.dht as hivemind_dht_module
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from swarm.errors import ConfigError, SwarmError
from swarm.reachability import serve_reachability_checks
from swarm.records import (
    MODEL_INDEX_KEY,
    ModelRecord,
    RawEntry,
    RecordSigner,
    Rejections,
    ServerRecord,
    block_key,
    parse_block_entries,
    parse_model_index,
)

logger = logging.getLogger(__name__)

DHT = hivemind.DHT  # re-exported: the sides name the type from here
DHT_CALL_TIMEOUT = 30.0  # seconds; a dead DHT process would otherwise block callers forever (trap 5)
# Furthest ahead a stored value may expire: Swarm's records live RECORD_EXPIRATION (60 s); the rest is
# room for clock skew between peers.
MAX_EXPIRATION_AHEAD = 600.0  # seconds
_OWNER_MARKER = b"[owner:"


def _stdlib_event_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


# hivemind/dht/dht.py:92 runs the DHT process on uvloop, whose non-blocking pipe kills that process
# on call arguments of 16 KiB or more (notes/hivemind.md, trap 1). A stdlib loop avoids it.
hivemind_dht_module.switch_to_uvloop = _stdlib_event_loop

RELAY_WAIT = 30.0  # seconds a peer behind NAT waits for its relayed address; measured: the first query has it
_make_p2pd_args = P2P._make_process_args


def _p2pd_args_with_static_relays(*args: Any, **kwargs: Any) -> list[str]:
    """p2pd's arguments, with relay discovery off whenever trusted relays are given.

    hivemind's P2P.create (p2p_daemon.py:206 builds the arguments) cannot pass p2pd's -relayDiscovery,
    which defaults to on. With discovery on, go-libp2p's autorelay waits for 4 relay candidates or
    3 minutes before it reserves a slot on any of them (measured: no circuit address after 50 s with
    one relay); with static relays only, it reserves at once.
    """
    if kwargs.get("trustedRelays"):
        kwargs["relayDiscovery"] = False
    return _make_p2pd_args(*args, **kwargs)


P2P._make_process_args = staticmethod(_p2pd_args_with_static_relays)


class _SubkeyedRecordsOnly(RecordValidatorBase):
    """Refuses values stored without a subkey, and values that expire more than MAX_EXPIRATION_AHEAD from now.

    In hivemind's storage a value without a subkey and with a later expiration replaces a key's whole
    dictionary (hivemind/dht/storage.py, DHTLocalStorage.store_subkey and TimedStorage.store), so one
    such store would hide every server of a block until it expires. Swarm stores only subkeyed values
    with short expirations, so every honest peer refuses the rest, both when asked to store them and
    in the answers to its own reads (hivemind/dht/protocol.py, _validate_record).
    """

    def validate(self, record: DHTRecord) -> bool:
        return record.subkey != DHTProtocol.IS_REGULAR_VALUE and record.expiration_time <= get_dht_time() + MAX_EXPIRATION_AHEAD


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    announce_maddrs: Sequence[str] = (),
    identity_path: str | None = None,
    identity_is_new: bool = False,
    client_mode: bool = False,
    use_relay: bool = True,
    relays: Sequence[str] = (),
) -> hivemind.DHT:
    """Start a DHT peer that signs its records; raise ConfigError if no initial peer answers.

    `use_relay`: reach peers that others cannot dial through libp2p circuit relays (and, unless in
    client mode, relay for them and answer their dial-back checks). `relays`: this peer cannot be
    dialed itself; it reserves a slot on these relays and others reach it through them. Such a peer
    is a DHT client (others could not reach it to ask it anything), and its announce addresses are
    dropped: p2pd would announce them instead of the relays' (p2pd/main.go sets an AddrsFactory).

    Unreachable initial peers fail in bounded time with hivemind's defaults, so none are set here:
    a closed port fails in under 1 s, a port that accepts but never speaks in about 6 s (p2pd gives
    up connecting after 5 s; a peer that connects but ignores the DHT's ping is dropped after
    DHTNode's `wait_timeout`, 3 s). Measured on loopback, hivemind 1.1.12.
    """
    check_maddrs(initial_peers, host_maddrs, announce_maddrs)
    check_maddrs(relays)
    if relays and not use_relay:
        raise ConfigError("a peer that serves through relays needs use_relay")
    kwargs: dict[str, Any] = dict(host_maddrs=list(host_maddrs), client_mode=client_mode or bool(relays), use_relay=use_relay)
    if relays:
        kwargs.update(use_auto_relay=True, force_reachability="private", trusted_relays=list(relays))
    elif announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    if identity_path:
        kwargs["identity_path"] = identity_path
    if identity_is_new:  # nobody else can hold a key generated a moment ago: skip hivemind's 0.2 s check
        kwargs["check_if_identity_free"] = False
    try:
        dht = hivemind.DHT(
            initial_peers=list(initial_peers),
            start=True,
            record_validators=[RSASignatureValidator(), _SubkeyedRecordsOnly()],
            **kwargs,
        )
    except Exception as e:
        message = _first_line(e)
        if "bootstrap" in message or "initial_peers" in message:
            raise ConfigError(f"none of the initial peers answered: {', '.join(initial_peers)}") from None
        raise SwarmError(f"could not start the DHT peer: {message}") from None
    if relays:
        _wait_for_relay(dht, relays)
    elif use_relay and not client_mode:
        dht.run_coroutine(_serve_reachability_checks, return_future=True).result(DHT_CALL_TIMEOUT)
    return dht


async def _serve_reachability_checks(dht: hivemind.DHT, node: Any) -> None:
    await serve_reachability_checks(node.p2p)  # in the DHT process, whose event loop serves for as long as it lives


def _wait_for_relay(dht: hivemind.DHT, relays: Sequence[str]) -> None:
    """Return once the peer announces a relayed address; SwarmError (and the DHT shut down) after RELAY_WAIT s."""
    deadline = time.monotonic() + RELAY_WAIT
    while not any("/p2p-circuit" in maddr for maddr in visible_maddrs(dht, latest=True)):
        if time.monotonic() > deadline:
            dht.shutdown()
            raise SwarmError(f"no relay gave this peer a slot within {RELAY_WAIT:.0f} s (asked: {', '.join(relays)}); "
                             "relays must have public IP addresses")
        time.sleep(0.1)


def start_server_dht(
    initial_peers: Sequence[str] = (),
    *,
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    announce_maddrs: Sequence[str] = (),
    identity_path: str | None = None,
    use_relay: bool = True,
    relays: Sequence[str] = (),
) -> tuple[hivemind.DHT, RecordSigner]:
    """A DHT peer that publishes records, and the signer of its libp2p identity (swarm.records).

    p2pd keeps a key it generates itself out of our reach, so the identity always comes from a file:
    `identity_path` (hivemind creates it if missing), or else a fresh one (RSA, as hivemind writes them,
    notes/hivemind.md §4) in a private temporary directory, deleted once the peer runs.
    """
    scratch = None if identity_path else tempfile.mkdtemp(prefix="swarm-identity-")
    path = str(Path(scratch, "identity.key")) if scratch is not None else str(identity_path)
    try:
        if scratch is not None:
            P2P.generate_identity(path)
        dht = start_dht(initial_peers, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs, identity_path=path,
                        identity_is_new=scratch is not None, use_relay=use_relay, relays=relays)
        identity = Path(path).read_bytes()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    try:
        signer = RecordSigner(identity)
        if signer.peer_id != peer_id_of(dht):  # our peer id derivation must be libp2p's, or no reader accepts us
            raise SwarmError(f"the identity key hashes to {signer.peer_id}, but the DHT peer is {peer_id_of(dht)}")
    except SwarmError:
        dht.shutdown()
        raise
    return dht, signer


# p2pd's errors reach us as "Daemon failed to start: 2026/01/02 03:04:05 <what went wrong>".
_GO_LOG_TIMESTAMP = re.compile(r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} ")


def _first_line(error: Exception) -> str:
    """The first line of an error's message without p2pd's log timestamp, for a one-line CLI error."""
    text = str(error).strip()
    return _GO_LOG_TIMESTAMP.sub("", text.splitlines()[0]) if text else type(error).__name__


def check_maddrs(initial_peers: Sequence[str] = (), host_maddrs: Sequence[str] = (), announce_maddrs: Sequence[str] = ()) -> None:
    """ConfigError naming the flag and the address unless every multiaddr is well-formed.

    Entry points call it before any slow start-up work, so that a typo fails at once.
    """
    for maddr in initial_peers:
        _check_maddr(maddr, "--initial-peers", needs_peer_id=True)
    for flag, maddrs in (("--host-maddrs", host_maddrs), ("--announce-maddrs", announce_maddrs)):
        for maddr in maddrs:
            _check_maddr(maddr, flag, needs_peer_id=False)


def _check_maddr(maddr: str, flag: str, *, needs_peer_id: bool) -> None:
    """ConfigError naming `flag` unless `maddr` parses (and, for a peer to join, names the peer's id)."""
    example = "/ip4/127.0.0.1/tcp/31337/p2p/Qm..." if needs_peer_id else "/ip4/0.0.0.0/tcp/31337"
    try:
        parsed = Multiaddr(maddr)
    except Exception:
        raise ConfigError(f"{flag}: {maddr!r} is not a multiaddress (e.g. {example})") from None
    if needs_peer_id and "p2p" not in parsed:  # p2pd would fail with a bare "invalid p2p multiaddr"
        raise ConfigError(f"{flag}: {maddr!r} has no /p2p/PEER_ID part naming the peer (e.g. {example})")


def visible_maddrs(dht: hivemind.DHT, latest: bool = False) -> list[str]:
    """The multiaddrs others can reach this peer at (with `latest`, asked from p2pd anew); may be empty."""
    try:
        return [str(maddr) for maddr in dht.get_visible_maddrs(latest=latest)]
    except ValueError:  # hivemind raises it when p2pd reports no address (a peer behind NAT before its relay)
        return []


def peer_id_of(dht: hivemind.DHT) -> str:
    return dht.peer_id.to_base58()


def _own_subkey(dht: hivemind.DHT) -> bytes:
    """This peer's subkey: its peer id, then the RSASignatureValidator's owner marker (only it may write there)."""
    validator = next(v for v in dht._record_validator._validators if isinstance(v, RSASignatureValidator))
    return dht.peer_id.to_base58().encode() + validator.local_public_key


def _entries(found: dict[Any, tuple[Any, float]], rejected: Rejections) -> list[RawEntry]:
    """The entries of one key whose subkeys name a peer; the others are counted as rejected."""
    entries = []
    for subkey, (value, expiration) in found.items():
        if not isinstance(subkey, bytes) or _OWNER_MARKER not in subkey:
            rejected.add(repr(subkey), "the subkey has no owner")
            continue
        peer_id = subkey.split(_OWNER_MARKER, 1)[0].decode("ascii", errors="replace")
        entries.append(RawEntry(peer_id, subkey, value, expiration))
    return entries


def declare_span(
    dht: hivemind.DHT,
    signer: RecordSigner,
    dht_prefix: str,
    record: ServerRecord,
    model: ModelRecord,
    expiration: float,
    blocks: range | None = None,
) -> None:
    """Store `record` under the block keys of `blocks` (default: its span), and the model in the index, in one DHT call.

    Each value is signed by this peer's identity for its key, subkey and expiration (swarm.records).
    """
    subkey = _own_subkey(dht)
    expires_at = get_dht_time() + expiration
    blocks = range(record.start, record.end) if blocks is None else blocks
    fields = record.to_wire()
    keys = [block_key(dht_prefix, index) for index in blocks]
    values = [signer.seal(key, subkey, expires_at, fields) for key in keys]
    keys.append(MODEL_INDEX_KEY)
    values.append(signer.seal(MODEL_INDEX_KEY, subkey, expires_at, model.to_wire()))
    call = functools.partial(_store_many, keys=keys, values=values, subkeys=[subkey] * len(keys), expiration=expires_at)
    dht.run_coroutine(call, return_future=True).result(DHT_CALL_TIMEOUT)


async def _store_many(dht: hivemind.DHT, node: Any, *, keys: list, values: list, subkeys: list, expiration: float) -> None:
    await node.store_many(keys, values, expiration, subkeys=subkeys)


def fetch_block_records(dht: hivemind.DHT, dht_prefix: str, num_blocks: int) -> list[dict[str, ServerRecord]]:
    """For each block, the valid records of the servers that announce it, by peer id (base58)."""
    found = fetch_records_at(dht, dht_prefix, range(num_blocks))
    return [found[index] for index in range(num_blocks)]


def fetch_records_at(
    dht: hivemind.DHT, dht_prefix: str, indices: range | list[int], rejected: Rejections | None = None
) -> dict[int, dict[str, ServerRecord]]:
    """The valid records announced for the given blocks only, in one DHT call; invalid ones go to `rejected`."""
    rejected = Rejections() if rejected is None else rejected
    keys = {index: block_key(dht_prefix, index) for index in indices}
    raw = dht.run_coroutine(functools.partial(_get_many, keys=list(keys.values())), return_future=True).result(DHT_CALL_TIMEOUT)
    parsed: dict[tuple[str, bytes], ServerRecord] = {}
    return {
        index: parse_block_entries(key, index, _entries(raw.get(key, {}), rejected), rejected, parsed)
        for index, key in keys.items()
    }


def fetch_model_index(dht: hivemind.DHT, rejected: Rejections | None = None) -> dict[str, dict[str, ModelRecord]]:
    """The signed entries of the model index as {dht_prefix: {peer_id: entry}}; invalid ones go to `rejected`."""
    rejected = Rejections() if rejected is None else rejected
    raw = dht.run_coroutine(functools.partial(_get_many, keys=[MODEL_INDEX_KEY]), return_future=True).result(DHT_CALL_TIMEOUT)
    return parse_model_index(_entries(raw.get(MODEL_INDEX_KEY, {}), rejected), rejected)


async def _get_many(dht: hivemind.DHT, node: Any, *, keys: list) -> dict[str, dict[Any, tuple[Any, float]]]:
    """{key: {subkey: (value, expiration time)}}; a key that holds no dictionary counts as empty."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))  # latest values, as DHT.get(latest=True)
    result: dict[str, dict[Any, tuple[Any, float]]] = {}
    for key, item in found.items():
        if item is None or not isinstance(item.value, dict):
            continue
        result[key] = {subkey: (entry.value, entry.expiration_time) for subkey, entry in item.value.items()}
    return result
