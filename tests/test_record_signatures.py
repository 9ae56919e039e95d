"""Signed records (swarm.records): only a peer's own identity key makes a record count, and no value breaks a read.

Pure functions over plain data, no processes. The identities are libp2p RSA keys as hivemind writes them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes
from hivemind.p2p import P2P, PeerID

from swarm import records
from swarm.records import (
    MAX_NUM_BLOCKS,
    MODEL_INDEX_KEY,
    ModelRecord,
    RawEntry,
    RecordSigner,
    Rejections,
    ServerRecord,
    ServerState,
    agreed_model,
    block_key,
    open_envelope,
    parse_block_entries,
    parse_model_index,
    peer_id_of_public_key,
)

PREFIX = "tiny"
KEY = block_key(PREFIX, 3)
EXPIRES = 1_900_000_000.25


def make_identity(path: Path) -> bytes:
    P2P.generate_identity(str(path))
    return path.read_bytes()


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    root = tmp_path_factory.mktemp("identities")
    return make_identity(root / "honest.key"), make_identity(root / "attacker.key")


@pytest.fixture(scope="module")
def honest(identities) -> RecordSigner:
    return RecordSigner(identities[0])


@pytest.fixture(scope="module")
def attacker(identities) -> RecordSigner:
    return RecordSigner(identities[1])


def subkey_of(peer_id: str, owner: bytes = b"[owner:ssh-rsa AAAA]") -> bytes:
    return peer_id.encode() + owner


def record(**changes) -> ServerRecord:  # noqa: ANN003
    fields = dict(state=ServerState.ONLINE, start=2, end=5, throughput=120.5, inference_rps=33.0, public_name="alice")
    return ServerRecord(**(fields | changes))


def entry(signer: RecordSigner, peer_id: str | None = None, value: object = None, expiration: float = EXPIRES,
          key: str = KEY, server: ServerRecord | None = None) -> RawEntry:
    """An entry naming `peer_id` (default: the signer's), holding `value` (default: `server` sealed by `signer`)."""
    peer_id = peer_id or signer.peer_id
    subkey = subkey_of(peer_id)
    if value is None:
        value = signer.seal(key, subkey, expiration, (server or record()).to_wire())
    return RawEntry(peer_id, subkey, value, expiration)


def test_peer_id_is_libp2p_multihash_of_the_identity_key(identities, honest):
    assert honest.peer_id == PeerID.from_identity(identities[0]).to_base58()
    assert peer_id_of_public_key(honest.public_key) == honest.peer_id


def test_a_sealed_record_opens_with_its_fields(honest):
    value = entry(honest).value
    assert set(value) >= {"body", "pk", "sig"}
    fields = open_envelope(KEY, honest.peer_id, subkey_of(honest.peer_id), EXPIRES, value)
    assert ServerRecord.from_wire(fields) == record()
    assert parse_block_entries(KEY, 3, [entry(honest)], Rejections()) == {honest.peer_id: record()}


def test_unknown_fields_in_the_body_are_ignored(honest):
    subkey = subkey_of(honest.peer_id)
    value = honest.seal(KEY, subkey, EXPIRES, record().to_wire() | {"future_field": {"anything": [1, 2]}})
    assert parse_block_entries(KEY, 3, [RawEntry(honest.peer_id, subkey, value, EXPIRES)], Rejections()) == {honest.peer_id: record()}


def forgeries(honest: RecordSigner, attacker: RecordSigner) -> dict[str, RawEntry]:
    """Values naming the honest peer that must all be dropped."""
    genuine = entry(honest).value
    offline = record(state=ServerState.OFFLINE)
    tampered_body = genuine | {"body": msgpack.packb(offline.to_wire())}
    attacker_pk = attacker.seal(KEY, subkey_of(honest.peer_id), EXPIRES, offline.to_wire())
    return {
        "signed by another identity": entry(attacker, honest.peer_id, attacker_pk),
        "tampered body": entry(honest, value=tampered_body),
        "unsigned plain record (version 1)": entry(honest, value=offline.to_wire()),
        "moved to another block": entry(honest, value=entry(honest, key=block_key(PREFIX, 4)).value),
        "moved to another model": entry(honest, value=entry(honest, key=block_key("other", 3)).value),
        "expiration extended": RawEntry(honest.peer_id, subkey_of(honest.peer_id), genuine, EXPIRES + 3600),
        "another subkey": RawEntry(honest.peer_id, subkey_of(honest.peer_id, b"[owner:other]"), genuine, EXPIRES),
        "signature of another value": entry(honest, value=genuine | {"sig": entry(honest, server=offline).value["sig"]}),
    }


def test_forged_records_are_dropped_and_never_hide_the_real_one(honest, attacker):
    forged = forgeries(honest, attacker)
    real = entry(honest)
    for order in (list(forged.values()) + [real], [real] + list(forged.values())):
        rejected = Rejections()
        assert parse_block_entries(KEY, 3, order, rejected) == {honest.peer_id: record()}
        assert rejected.count == len(forged)
    for name, forgery in forged.items():
        assert parse_block_entries(KEY, 3, [forgery], Rejections()) == {}, name


class Descriptor:
    """Stands for an object that hivemind's msgpack ext types decode to (e.g. its BatchTensorDescriptor)."""


HOSTILE_VALUES = [
    None, 7, 1.5, "text", b"bytes", [1, 2], {1, 2}, Descriptor(), msgpack.ExtType(0x51, b"\x00" * 8),
    {"body": Descriptor(), "pk": b"x", "sig": b"y"},
    {"body": msgpack.ExtType(0x51, b""), "pk": b"x", "sig": b"y"},
    {"body": b"x" * 100_000, "pk": b"x", "sig": b"y"},
    {"body": b"", "pk": b"x" * 100_000, "sig": b"y"},
    {"body": b"", "pk": b"", "sig": b""},
    {"body": "str", "pk": "str", "sig": "str"},
    {(1, 2): 3},
]
HOSTILE_PEER_IDS = ["0OIl0OIl", "", "x" * 10_000, "\ufffd\x00", "Qm" + "1" * 44]


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=range(len(HOSTILE_VALUES)))
def test_values_of_any_shape_or_type_are_dropped_and_counted(honest, value):
    for peer_id in [honest.peer_id, *HOSTILE_PEER_IDS]:
        rejected = Rejections()
        hostile = RawEntry(peer_id, subkey_of(peer_id), value, EXPIRES)
        assert parse_block_entries(KEY, 3, [hostile, entry(honest)], rejected) == {honest.peer_id: record()}
        assert rejected.count == 1
        assert all(len(label) <= 64 for label in rejected.reasons)


def self_signed(public_key: bytes, body: bytes, signature: bytes = b"s" * 256) -> RawEntry:
    """An envelope that names the peer id its (possibly nonsensical) public key hashes to."""
    peer_id = peer_id_of_public_key(public_key)
    return RawEntry(peer_id, subkey_of(peer_id), {"body": body, "pk": public_key, "sig": signature}, EXPIRES)


@pytest.mark.parametrize("public_key", [b"", b"\x08", b"\x08\x01\x12\x20" + b"k" * 32, b"\x08\x00\x12\x05abc",
                                        b"\x08\x00\x12\x03abc", b"\x08\xff\xff\xff\xff\xff\xff", b"\x08\x00\x12\x81"])
def test_a_peer_id_made_from_a_garbage_key_is_dropped(public_key):
    rejected = Rejections()
    assert parse_block_entries(KEY, 3, [self_signed(public_key, msgpack.packb(record().to_wire()))], rejected) == {}
    assert rejected.count == 1


@pytest.mark.parametrize("body", [msgpack.packb([1, 2]), b"\xc1", msgpack.packb({"state": msgpack.ExtType(5, b"")}),
                                  msgpack.packb(record().to_wire())[:-3], msgpack.packb(record().to_wire()) + b"\x00",
                                  msgpack.packb(record().to_wire() | {"start": 2**70 // 2**10})])
def test_a_correctly_signed_but_malformed_body_is_dropped(honest, body):
    subkey = subkey_of(honest.peer_id)
    signature = honest._key.sign(records._signed_message(KEY, subkey, EXPIRES, body), records._PSS, hashes.SHA256())
    value = {"body": body, "pk": honest.public_key, "sig": signature}
    rejected = Rejections()
    assert parse_block_entries(KEY, 3, [RawEntry(honest.peer_id, subkey, value, EXPIRES)], rejected) == {}
    assert rejected.count == 1


def test_a_restarted_peer_counts_with_its_latest_record(honest):
    old = entry(honest, server=record(state=ServerState.OFFLINE), expiration=EXPIRES)
    new = RawEntry(honest.peer_id, subkey_of(honest.peer_id, b"[owner:new]"),
                   honest.seal(KEY, subkey_of(honest.peer_id, b"[owner:new]"), EXPIRES + 30, record().to_wire()), EXPIRES + 30)
    for order in itertools.permutations([old, new]):
        assert parse_block_entries(KEY, 3, order, Rejections()) == {honest.peer_id: record()}


def test_rejection_reasons_are_bounded_but_every_drop_is_counted(honest):
    rejected = Rejections()
    entries = [RawEntry(f"peer{i}", subkey_of(f"peer{i}"), {"x": i}, EXPIRES) for i in range(1000)]
    parse_block_entries(KEY, 3, entries, rejected)
    assert rejected.count == 1000 and len(rejected.reasons) <= 32


def index_entry(signer: RecordSigner, num_blocks: int, prefix: str = PREFIX) -> RawEntry:
    subkey = subkey_of(signer.peer_id)
    model = {"dht_prefix": prefix, "num_blocks": num_blocks, "model_type": "llama"}
    return RawEntry(signer.peer_id, subkey, signer.seal(MODEL_INDEX_KEY, subkey, EXPIRES, model), EXPIRES)


def test_the_model_index_takes_the_number_of_blocks_its_servers_state(honest, attacker):
    rejected = Rejections()
    huge = index_entry(attacker, MAX_NUM_BLOCKS + 1)
    forged = RawEntry(honest.peer_id, subkey_of(honest.peer_id), index_entry(attacker, 6).value, EXPIRES)
    index = parse_model_index([huge, forged, index_entry(honest, 6)], rejected)
    assert rejected.count == 2
    assert index == {PREFIX: {honest.peer_id: ModelRecord(PREFIX, 6, "llama")}}

    # A claim counts only from a peer that serves the model, within the blocks it claims.
    claims = {honest.peer_id: ModelRecord(PREFIX, 6, "llama"), attacker.peer_id: ModelRecord(PREFIX, MAX_NUM_BLOCKS, "llama")}
    rejected = Rejections()
    assert agreed_model(claims, {honest.peer_id: record(start=4, end=6)}, rejected) == ModelRecord(PREFIX, 6, "llama")
    assert rejected.count == 1
    assert agreed_model(claims, {}, Rejections()) is None
    too_small = {honest.peer_id: ModelRecord(PREFIX, 4, "llama")}
    assert agreed_model(too_small, {honest.peer_id: record(start=4, end=6)}, Rejections()) is None
