"""The DHT record contract: key format, the server record, how it is signed, and its validation.

One key per block, `"{dht_prefix}.{block_index}"`; under it, one subkey per server: the server's
peer id (base58) followed by the DHT's ownership marker (swarm.dht adds it). One key for the model
index, `MODEL_INDEX_KEY`, with the same subkeys. A value is a signed envelope:

    {"v": 2, "body": msgpack bytes of the record's fields, "pk": libp2p public key, "sig": signature}

Why a reader can believe a record it accepts (`open_envelope`):
- `pk` is the writer's libp2p identity public key, encoded as libp2p does (a `PublicKey` protobuf
  holding an RSA key in DER). A libp2p peer id *is* the multihash of those bytes (sha2-256 for RSA
  keys), so the reader recomputes it and requires it to equal the peer id in the subkey: only the
  holder of that identity's private key can make `sig` verify under `pk`. Transport-level libp2p
  already proves this key to everyone who talks to the server, so the record and the RPC endpoint
  are the same principal.
- `sig` (RSA-PSS, SHA-256) covers a domain tag, the DHT key, the whole subkey, the expiration time
  and the body bytes. A signed body cannot be moved to another block, model or subkey, nor kept alive
  past the expiration its writer chose; replaying an old record under the writer's own subkey loses
  to the newer one (the DHT keeps the later expiration), and under any other subkey fails to verify.
- The body is decoded by our own msgpack call (no ext types, bounded size) only after the signature
  holds, and every field is type-checked and bounded (`ServerRecord.from_wire`).
- The ownership marker that swarm.dht adds (hivemind's RSASignatureValidator, a per-process key) stops
  other peers from overwriting a server's subkey on honest DHT nodes; it is not what makes a record
  believable. A value under a server's peer id written by anyone else sits under a different subkey,
  fails verification and is dropped, so it never hides the server's real record.

Readers ignore fields they do not know, so versions can mix; anything that fails is dropped and
counted (`Rejections`), and no value, however malformed, makes a read raise.

This module knows nothing about hivemind; swarm.dht stores and fetches these records.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import base58
import msgpack
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from swarm.errors import ConfigError, InvalidRecord

logger = logging.getLogger(__name__)

RECORD_VERSION = 2  # 2: signed envelopes; readers drop version 1's unsigned values
MODEL_INDEX_KEY = "_swarm.models"
REACHABILITY = ("direct", "relay")  # how clients reach a server: dialling it, or through a libp2p circuit relay

# Bounds on what a reader accepts. A 2048-bit RSA key is 299 bytes as a libp2p PublicKey and signs in
# 256 bytes; a record's body is about 300 bytes (next_pings of 8 servers adds about 400).
MAX_NUM_BLOCKS = 1024  # blocks of a model (the largest open models have about 130)
MAX_PUBLIC_KEY_BYTES = 1024
MAX_SIGNATURE_BYTES = 1024
MAX_BODY_BYTES = 8192
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 4096
MAX_REASONS_KEPT = 32  # rejection reasons kept for display; the count covers them all
_MAX_STRING = 256
_MAX_LIST = 64
_PEER_ID_LABEL = 64  # characters of an untrusted peer id kept in logs and on the health page

_SIGNATURE_DOMAIN = b"swarm-record-v2"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
_LIBP2P_RSA = 0  # KeyType.RSA in libp2p's crypto.proto
_SHA2_256_MULTIHASH = b"\x12\x20"  # multihash code and digest length of sha2-256


class ServerState(str, enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


def block_key(dht_prefix: str, block_index: int) -> str:
    return f"{dht_prefix}.{block_index}"


def block_ranges(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted block indices as half-open ranges of consecutive blocks, e.g. [1, 2, 5] -> [(1, 3), (5, 6)]."""
    ranges: list[tuple[int, int]] = []
    for index in indices:
        if ranges and ranges[-1][1] == index:
            ranges[-1] = (ranges[-1][0], index + 1)
        else:
            ranges.append((index, index + 1))
    return ranges


_BLOCK_RANGE = re.compile(r"([0-9]{1,4}):([0-9]{1,4})")
CLIENT_PART = "client"  # a manifest's part of the embeddings, final norm and head (swarm.manifest)


def shares_of(parts: Iterable[str]) -> tuple[str, ...]:
    """A record's `shares` for manifest parts ("client", "block:N"): e.g. ("client", "0:30")."""
    parts = set(parts)
    blocks = sorted(int(part.split(":", 1)[1]) for part in parts if part.startswith("block:"))
    shared = [f"{start}:{end}" for start, end in block_ranges(blocks)]
    return ((CLIENT_PART,) if CLIENT_PART in parts else ()) + tuple(shared)


def parts_shared(shares: Iterable[str]) -> frozenset[str]:
    """The manifest parts a record's `shares` names; InvalidRecord on anything malformed."""
    parts: set[str] = set()
    for item in shares:
        if item == CLIENT_PART:
            parts.add(CLIENT_PART)
            continue
        match = _BLOCK_RANGE.fullmatch(item)
        if match is None or not 0 <= int(match[1]) < int(match[2]) <= MAX_NUM_BLOCKS:
            raise InvalidRecord(f"shares entry {item[:32]!r} is neither 'client' nor a block range A:B")
        parts.update(f"block:{index}" for index in range(int(match[1]), int(match[2])))
    return frozenset(parts)


# --- identity: libp2p keys and peer ids -------------------------------------------------------------


def peer_id_of_public_key(public_key: bytes) -> str:
    """The libp2p peer id (base58) of a protobuf-encoded RSA public key: base58(multihash sha2-256 of the bytes)."""
    return base58.b58encode(_SHA2_256_MULTIHASH + hashlib.sha256(public_key).digest()).decode()


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while position < len(data) and shift < 35:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7
    raise InvalidRecord("malformed key encoding")


def _unwrap_libp2p_key(encoded: bytes) -> bytes:
    """The DER inside a libp2p PublicKey/PrivateKey protobuf of an RSA key (fields: 1 key_type, 2 data)."""
    if encoded[:1] != b"\x08":
        raise InvalidRecord("malformed key encoding")
    key_type, position = _read_varint(encoded, 1)
    if key_type != _LIBP2P_RSA:
        raise InvalidRecord(f"key type {key_type} is not RSA")
    if encoded[position : position + 1] != b"\x12":
        raise InvalidRecord("malformed key encoding")
    length, position = _read_varint(encoded, position + 1)
    if position + length != len(encoded):
        raise InvalidRecord("malformed key encoding")
    return encoded[position:]


def _wrap_libp2p_key(der: bytes) -> bytes:
    length, varint = len(der), bytearray()
    while True:
        varint.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    return b"\x08" + bytes([_LIBP2P_RSA]) + b"\x12" + bytes(varint) + der


def _signed_message(key: str, subkey: bytes, expiration: float, body: bytes) -> bytes:
    return msgpack.packb([_SIGNATURE_DOMAIN, key, subkey, float(expiration), body])


class RecordSigner:
    """Signs records with the private key of this peer's libp2p identity.

    `identity` is the identity file's content: a libp2p PrivateKey protobuf holding an RSA key in DER,
    as hivemind writes it (`identity_path`); other key types raise ConfigError.
    """

    def __init__(self, identity: bytes):
        try:
            key = serialization.load_der_private_key(_unwrap_libp2p_key(identity), password=None)
        except (InvalidRecord, ValueError, TypeError, UnsupportedAlgorithm):
            raise ConfigError("the identity file does not hold an RSA libp2p private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError("the identity file does not hold an RSA libp2p private key")
        self._key = key
        spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.public_key = _wrap_libp2p_key(spki)
        self.peer_id = peer_id_of_public_key(self.public_key)

    def seal(self, key: str, subkey: bytes, expiration: float, fields: dict[str, Any]) -> dict[str, Any]:
        """The envelope to store under (key, subkey) with this expiration (an absolute DHT time)."""
        body = msgpack.packb(fields)
        signature = self._key.sign(_signed_message(key, subkey, expiration, body), _PSS, hashes.SHA256())
        return {"v": RECORD_VERSION, "body": body, "pk": self.public_key, "sig": signature}


def open_envelope(key: str, peer_id: str, subkey: bytes, expiration: float, value: Any,
                  max_body_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The fields that `peer_id`'s identity signed for (key, subkey, expiration); else InvalidRecord.

    `value` is whatever the DHT returned, of any type: it is only read after every check on its shape.
    """
    if not isinstance(value, dict):
        raise InvalidRecord(f"value is a {type(value).__name__}, not a signed envelope")
    body = _bytes_part(value, "body", max_body_bytes)
    public_key = _bytes_part(value, "pk", MAX_PUBLIC_KEY_BYTES)
    signature = _bytes_part(value, "sig", MAX_SIGNATURE_BYTES)
    if isinstance(expiration, bool) or not isinstance(expiration, (int, float)) or not math.isfinite(expiration):
        raise InvalidRecord("bad expiration time")
    if peer_id_of_public_key(public_key) != peer_id:
        raise InvalidRecord("the public key is not the identity of the peer the record names")
    try:
        rsa_key = serialization.load_der_public_key(_unwrap_libp2p_key(public_key))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidRecord("unreadable public key") from None
    if not isinstance(rsa_key, rsa.RSAPublicKey) or not MIN_RSA_BITS <= rsa_key.key_size <= MAX_RSA_BITS:
        raise InvalidRecord("the public key is not an RSA key of 2048-4096 bits")
    try:
        rsa_key.verify(signature, _signed_message(key, subkey, expiration, body), _PSS, hashes.SHA256())
    except InvalidSignature:
        raise InvalidRecord("bad signature") from None
    return _decode_body(body)


def envelope_signer(value: Any) -> str:
    """The peer id of the key an envelope claims to be signed with (to be checked by open_envelope)."""
    if not isinstance(value, dict):
        raise InvalidRecord(f"value is a {type(value).__name__}, not a signed envelope")
    return peer_id_of_public_key(_bytes_part(value, "pk", MAX_PUBLIC_KEY_BYTES))


def _bytes_part(envelope: dict[Any, Any], name: str, limit: int) -> bytes:
    part = envelope.get(name)
    if not isinstance(part, bytes) or len(part) > limit:
        raise InvalidRecord(f"envelope field {name!r} is not bytes of at most {limit}")
    return part


def _refuse_ext(code: int, data: bytes) -> Any:
    raise InvalidRecord(f"msgpack ext type {code}")


def _decode_body(body: bytes) -> dict[str, Any]:
    try:
        # `body` is at most MAX_BODY_BYTES (checked by the caller), which bounds what this can allocate.
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except InvalidRecord:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises several types on hostile bytes; all mean "invalid"
        raise InvalidRecord(f"undecodable body ({type(e).__name__})") from None
    if not isinstance(fields, dict):
        raise InvalidRecord(f"body is a {type(fields).__name__}, not a dict")
    return fields


# --- the records ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerRecord:
    """What a server announces under each block key of its span."""

    state: ServerState
    start: int  # first block held (global index)
    end: int  # one past the last block held
    throughput: float = 0.0  # forward tokens/s through one block (batched); 0 = not measured
    inference_rps: float = 0.0  # single-token decode steps/s through one block; 0 = not measured
    cache_tokens_left: int = 0  # attention-cache room, in tokens of one sequence
    max_tokens_per_request: int = 0  # batch x tokens one request may carry; 0 = not announced (the default)
    torch_dtype: str = "float32"
    quant_type: str = "none"
    codecs: tuple[str, ...] = ("none",)
    adapters: tuple[str, ...] = ()  # hashes of the adapters it holds (swarm/adapter_manifest.py), most recently used first
    version: str = ""
    public_name: str = ""
    reachability: str = "direct"  # "direct" | "relay"
    # Round trips (seconds) to servers that hold this server's `end` block, measured by this server.
    next_pings: tuple[tuple[str, float], ...] = ()
    # What this server shares over swarm.fetch besides the manifest and config: "client" (embeddings,
    # final norm, head) and block ranges "A:B" whose tensors it holds (see `shares_of` / `parts_shared`).
    shares: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end <= MAX_NUM_BLOCKS):
            raise InvalidRecord(f"impossible span {self.start}:{self.end}")
        if self.throughput < 0 or self.inference_rps < 0 or self.cache_tokens_left < 0 or self.max_tokens_per_request < 0:
            raise InvalidRecord("negative throughput or cache size")

    def to_wire(self) -> dict[str, Any]:
        value = dataclasses.asdict(self)
        value["state"] = self.state.value
        value["codecs"] = list(self.codecs)
        value["adapters"] = list(self.adapters)
        value["next_pings"] = dict(self.next_pings)
        value["shares"] = list(self.shares)
        return value

    @classmethod
    def from_wire(cls, value: Any) -> ServerRecord:
        """Validate a record's fields (an opened envelope's body); raise InvalidRecord if they break the schema."""
        if not isinstance(value, dict):
            raise InvalidRecord(f"record is a {type(value).__name__}, not a dict")
        fields: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in value:
                if field.default is dataclasses.MISSING:
                    raise InvalidRecord(f"record lacks {field.name!r}")
                continue
            fields[field.name] = _check_field(field.name, value[field.name])
        try:
            fields["state"] = ServerState(fields["state"])
        except ValueError:
            raise InvalidRecord(f"unknown state {fields['state']!r}") from None
        return cls(**fields)


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "state": str,
    "start": int,
    "end": int,
    "throughput": (int, float),
    "inference_rps": (int, float),
    "cache_tokens_left": int,
    "max_tokens_per_request": int,
    "torch_dtype": str,
    "quant_type": str,
    "codecs": (list, tuple),
    "adapters": (list, tuple),
    "version": str,
    "public_name": str,
    "reachability": str,
    "next_pings": dict,
    "shares": (list, tuple),
}
_MAX_INT = 2**53  # integers beyond this are no token count or block index


def _check_field(name: str, value: Any) -> Any:
    expected = _FIELD_TYPES[name]
    if isinstance(value, bool) or not isinstance(value, expected):
        raise InvalidRecord(f"field {name!r} has type {type(value).__name__}")
    if isinstance(value, int) and abs(value) > _MAX_INT:
        raise InvalidRecord(f"field {name!r} is out of range")
    if isinstance(value, str) and len(value) > _MAX_STRING:
        raise InvalidRecord(f"field {name!r} is too long")
    if name == "reachability" and value not in REACHABILITY:
        raise InvalidRecord(f"reachability must be one of {', '.join(REACHABILITY)}")
    if isinstance(value, (list, tuple)):
        if len(value) > _MAX_LIST or not all(isinstance(item, str) and len(item) <= _MAX_STRING for item in value):
            raise InvalidRecord(f"field {name!r} must be a short list of short strings")
        if name == "shares":
            parts_shared(value)  # raises InvalidRecord on anything but "client" and block ranges
        return tuple(value)
    if isinstance(value, dict):  # next_pings
        if len(value) > _MAX_LIST or not all(
            _looks_like_peer_id(peer) and isinstance(rtt, (int, float)) and not isinstance(rtt, bool)
            and math.isfinite(rtt) and rtt >= 0
            for peer, rtt in value.items()
        ):
            raise InvalidRecord("field 'next_pings' must map peer ids to finite, non-negative seconds")
        return tuple(sorted((peer, float(rtt)) for peer, rtt in value.items()))
    if isinstance(value, (int, float)) and name in ("throughput", "inference_rps"):
        if not math.isfinite(value):
            raise InvalidRecord(f"field {name!r} is not finite")
        return float(value)
    return value


_BASE58_ALPHABET = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


def _looks_like_peer_id(text: Any) -> bool:
    return isinstance(text, str) and 0 < len(text) <= _PEER_ID_LABEL and set(text) <= _BASE58_ALPHABET


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """A server's entry in the model index: the model it serves (by DHT prefix) and its number of blocks."""

    dht_prefix: str
    num_blocks: int
    model_type: str

    def to_wire(self) -> dict[str, Any]:
        return {"dht_prefix": self.dht_prefix, "num_blocks": self.num_blocks, "model_type": self.model_type}

    @classmethod
    def from_wire(cls, value: Any) -> ModelRecord:
        if not isinstance(value, dict):
            raise InvalidRecord("model record is not a dict")
        dht_prefix, num_blocks, model_type = value.get("dht_prefix"), value.get("num_blocks"), value.get("model_type")
        if not isinstance(dht_prefix, str) or not 0 < len(dht_prefix) <= _MAX_STRING:
            raise InvalidRecord("bad dht_prefix")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 0 < num_blocks <= MAX_NUM_BLOCKS:
            raise InvalidRecord(f"num_blocks is not in 1..{MAX_NUM_BLOCKS}")
        if not isinstance(model_type, str) or len(model_type) > _MAX_STRING:
            raise InvalidRecord("bad model_type")
        return cls(dht_prefix=dht_prefix, num_blocks=num_blocks, model_type=model_type)


# --- reading ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RawEntry:
    """One subkey's value under a DHT key, as read. `peer_id` is the (untrusted) peer named by the subkey."""

    peer_id: str
    subkey: bytes
    value: Any
    expiration: float


@dataclasses.dataclass
class Rejections:
    """Entries dropped during reads: how many, and a few reasons by (untrusted) writer for display."""

    count: int = 0
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, peer_id: str, reason: str) -> None:
        self.count += 1
        label = peer_id[:_PEER_ID_LABEL]
        if label in self.reasons or len(self.reasons) < MAX_REASONS_KEPT:
            self.reasons[label] = reason
        logger.debug("ignoring a record of %r: %s", label, reason)


def parse_block_entries(
    key: str,
    block_index: int,
    entries: Iterable[RawEntry],
    rejected: Rejections,
    parsed: dict[tuple[str, bytes], ServerRecord] | None = None,
) -> dict[str, ServerRecord]:
    """The valid records under one block key, by peer id; the rest are dropped and counted in `rejected`.

    A peer with several valid records (a restart under the same identity) counts with the one that
    expires last. `parsed` (shared across the blocks of one read) makes a server's records along its
    span one object, parsed once.
    """
    records: dict[str, tuple[float, ServerRecord]] = {}
    for entry in entries:
        try:
            fields = open_envelope(key, entry.peer_id, entry.subkey, entry.expiration, entry.value)
            cache_key = (entry.peer_id, entry.value["body"])
            record = parsed.get(cache_key) if parsed is not None else None
            if record is None:
                record = ServerRecord.from_wire(fields)
                if parsed is not None:
                    parsed[cache_key] = record
            if not record.start <= block_index < record.end:
                raise InvalidRecord(f"span {record.start}:{record.end} does not contain block {block_index}")
        except InvalidRecord as e:
            rejected.add(entry.peer_id, str(e))
            continue
        if entry.peer_id not in records or records[entry.peer_id][0] < entry.expiration:
            records[entry.peer_id] = (entry.expiration, record)
    return {peer_id: record for peer_id, (_, record) in records.items()}


def parse_model_index(entries: Iterable[RawEntry], rejected: Rejections) -> dict[str, dict[str, ModelRecord]]:
    """The valid, signed entries of the model index as {dht_prefix: {peer_id: entry}}; the rest are counted."""
    latest: dict[tuple[str, str], tuple[float, ModelRecord]] = {}
    for entry in entries:
        try:
            model = ModelRecord.from_wire(open_envelope(MODEL_INDEX_KEY, entry.peer_id, entry.subkey, entry.expiration, entry.value))
        except InvalidRecord as e:
            rejected.add(entry.peer_id, f"model index: {e}")
            continue
        slot = (model.dht_prefix, entry.peer_id)
        if slot not in latest or latest[slot][0] < entry.expiration:
            latest[slot] = (entry.expiration, model)
    index: dict[str, dict[str, ModelRecord]] = {}
    for (prefix, peer_id), (_, model) in latest.items():
        index.setdefault(prefix, {})[peer_id] = model
    return index


def agreed_model(claims: Mapping[str, ModelRecord], servers: Mapping[str, ServerRecord], rejected: Rejections) -> ModelRecord | None:
    """The model's entry as its own servers state it, or None if none of the claimants serves it.

    `claims` are the index entries for one prefix by peer id; `servers` the valid block records read
    for that prefix by peer id. A claim counts only if its writer serves the model (has a valid block
    record there) within the blocks it claims; of those, the entry most servers agree on wins (ties:
    the larger model, whose missing blocks then show). The other claims are dropped and counted.
    """
    supported = [model for peer, model in claims.items() if peer in servers and servers[peer].end <= model.num_blocks]
    if not supported:
        for peer in claims:
            rejected.add(peer, "model index: the writer serves no block of this model")
        return None
    votes: dict[ModelRecord, int] = {}
    for model in supported:
        votes[model] = votes.get(model, 0) + 1
    chosen = max(votes, key=lambda model: (votes[model], model.num_blocks))
    for peer, model in claims.items():
        if model != chosen:
            rejected.add(peer, f"model index: claims {model.num_blocks} blocks, the model's servers say {chosen.num_blocks}")
    return chosen
