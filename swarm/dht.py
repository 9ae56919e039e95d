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
import time
from collections.abc import Sequence
from typing import Any

import hivemind
import hivemind.dht.dht as hivemind_dht_module
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from swarm.errors import ConfigError, SwarmError
from swarm.reachability import serve_reachability_checks
from swarm.records import MODEL_INDEX_KEY, InvalidRecord, ModelRecord, ServerRecord, block_key, parse_block_entries

logger = logging.getLogger(__name__)

DHT = hivemind.DHT  # re-exported: the sides name the type from here
DHT_CALL_TIMEOUT = 30.0  # seconds; a dead DHT process would otherwise block callers forever (trap 5)
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


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    announce_maddrs: Sequence[str] = (),
    identity_path: str | None = None,
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
    try:
        dht = hivemind.DHT(
            initial_peers=list(initial_peers),
            start=True,
            record_validators=[RSASignatureValidator()],
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
    validator = next(v for v in dht._record_validator._validators if isinstance(v, RSASignatureValidator))
    return dht.peer_id.to_base58().encode() + validator.local_public_key


def _peer_of_subkey(subkey: Any) -> str | None:
    if not isinstance(subkey, bytes) or _OWNER_MARKER not in subkey:
        return None
    return subkey.split(_OWNER_MARKER, 1)[0].decode(errors="replace")


def declare_span(
    dht: hivemind.DHT,
    dht_prefix: str,
    record: ServerRecord,
    model: ModelRecord,
    expiration: float,
    blocks: range | None = None,
) -> None:
    """Store `record` under the block keys of `blocks` (default: its span), and the model in the index, in one DHT call."""
    subkey = _own_subkey(dht)
    blocks = range(record.start, record.end) if blocks is None else blocks
    keys = [block_key(dht_prefix, index) for index in blocks]
    values: list[Any] = [record.to_wire()] * len(keys)
    keys.append(MODEL_INDEX_KEY)
    values.append(model.to_wire())
    subkeys = [subkey] * (len(keys) - 1) + [dht_prefix.encode() + subkey[len(dht.peer_id.to_base58()) :]]
    call = functools.partial(_store_many, keys=keys, values=values, subkeys=subkeys, expiration=get_dht_time() + expiration)
    dht.run_coroutine(call, return_future=True).result(DHT_CALL_TIMEOUT)


async def _store_many(dht: hivemind.DHT, node: Any, *, keys: list, values: list, subkeys: list, expiration: float) -> None:
    await node.store_many(keys, values, expiration, subkeys=subkeys)


def fetch_block_records(dht: hivemind.DHT, dht_prefix: str, num_blocks: int) -> list[dict[str, ServerRecord]]:
    """For each block, the valid records of the servers that announce it, by peer id (base58)."""
    found = fetch_records_at(dht, dht_prefix, range(num_blocks))
    return [found[index] for index in range(num_blocks)]


def fetch_records_at(
    dht: hivemind.DHT, dht_prefix: str, indices: range | list[int], rejected: dict[str, str] | None = None
) -> dict[int, dict[str, ServerRecord]]:
    """The valid records announced for the given blocks only, in one DHT call (`rejected`: see parse_block_entries)."""
    keys = {index: block_key(dht_prefix, index) for index in indices}
    raw = dht.run_coroutine(functools.partial(_get_many, keys=list(keys.values())), return_future=True).result(DHT_CALL_TIMEOUT)
    parsed: dict = {}
    blocks = {}
    for index, key in keys.items():
        entries = {}
        for subkey, value in raw.get(key, {}).items():
            peer = _peer_of_subkey(subkey)
            if peer is not None:
                entries[peer] = value
        blocks[index] = parse_block_entries(index, entries, parsed, rejected)
    return blocks


def fetch_model_index(dht: hivemind.DHT) -> dict[str, ModelRecord]:
    """The models the swarm serves, by DHT prefix, from the servers' entries in the model index."""
    raw = dht.run_coroutine(functools.partial(_get_many, keys=[MODEL_INDEX_KEY]), return_future=True).result(DHT_CALL_TIMEOUT)
    models: dict[str, ModelRecord] = {}
    for subkey, value in raw.get(MODEL_INDEX_KEY, {}).items():
        prefix = _peer_of_subkey(subkey)  # the index's subkeys are the prefix followed by the owner's key
        try:
            if prefix:
                models[prefix] = ModelRecord.from_wire(value)
        except InvalidRecord:
            logger.debug("ignoring an invalid model index entry for %r", prefix)
    return models


async def _get_many(dht: hivemind.DHT, node: Any, *, keys: list) -> dict[str, dict[Any, Any]]:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))  # latest values, as DHT.get(latest=True)
    result: dict[str, dict[Any, Any]] = {}
    for key, item in found.items():
        if item is None or not isinstance(item.value, dict):
            continue
        result[key] = {subkey: entry.value for subkey, entry in item.value.items()}
    return result
