"""Pure pieces of server-held adapters: manifests and hashes, signed name records, the store, routing preference."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.adapter_manifest import AdapterManifest, build_manifest, verify_slice
from swarm.adapter_records import AdapterName, best_name_record, open_name_record
from swarm.errors import InvalidRecord, InvalidRequest, LimitExceeded
from swarm.records import RawEntry, RecordSigner, Rejections, ServerRecord, ServerState
from swarm.server.adapter_store import AdapterStore, HeldAdapter
from swarm.transport import P2P
from swarm.client.routing import forward_route, inference_route


def matrices(blocks: range, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"{b}.self_attn.q_proj.{kind}": torch.randn(*((4, 16) if kind == "lora_A" else (16, 4)), generator=generator)
            for b in blocks for kind in ("lora_A", "lora_B")}


def signer(tmp_path, name: str) -> RecordSigner:
    P2P.generate_identity(str(tmp_path / name))
    return RecordSigner((tmp_path / name).read_bytes())


def test_manifest_hash_is_content_and_survives_the_wire():
    tensors = matrices(range(3))
    manifest = build_manifest("llama-x", 4, 8, 0.0, False, tensors)
    assert AdapterManifest.decode(manifest.encode()) == manifest
    assert build_manifest("llama-x", 4, 8, 0.0, False, matrices(range(3))).hash == manifest.hash
    assert build_manifest("llama-y", 4, 8, 0.0, False, tensors).hash != manifest.hash  # the base model is part of it
    verify_slice(manifest, {n: t for n, t in tensors.items() if n.startswith("1.")}, 1, 2)  # a slice verifies alone
    corrupted = {**tensors, "0.self_attn.q_proj.lora_A": tensors["0.self_attn.q_proj.lora_A"] + 1e-6}
    with pytest.raises(InvalidRequest, match="does not match its hash"):
        verify_slice(manifest, corrupted, 0, 3)
    with pytest.raises(InvalidRequest, match="missing"):
        verify_slice(manifest, {}, 0, 1)


@pytest.mark.parametrize("payload", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"format": "swarm-adapter/1"}),
                                     msgpack.packb({"format": "swarm-adapter/1", "base": "m", "rank": 4, "alpha": 8.0, "dropout": 0.0,
                                                    "rslora": False, "tensors": {"0.q.lora_A": [[5, 16], "0" * 64]}}),
                                     b"\x00" * (2 << 20)])
def test_hostile_manifests_are_refused(payload):
    with pytest.raises(InvalidRequest):
        AdapterManifest.decode(payload)


def test_name_records_are_signed_and_only_extend_under_their_key(tmp_path):
    alice, mallory = signer(tmp_path, "alice"), signer(tmp_path, "mallory")
    first = AdapterName("bot", "llama-x", ()).with_version("a" * 64, (), "trained", "data.jsonl sha256 ...", 1.0).sign(alice)
    second = first.with_version("b" * 64, ("a" * 64,), "trained", "", 2.0).sign(alice)
    wire = msgpack.unpackb(msgpack.packb(second.envelope))
    opened = open_name_record("llama-x", "bot", wire)
    assert opened.publisher == alice.peer_id and [v.version for v in opened.versions] == [1, 2]
    assert opened.version(1).hash == "a" * 64 and opened.latest().parents == ("a" * 64,)
    with pytest.raises(InvalidRequest, match="no version 3"):
        opened.version(3)
    with pytest.raises(InvalidRecord):
        open_name_record("llama-x", "other-name", wire)  # the signature covers the name and the base model
    tampered = {**wire, "body": wire["body"].replace(b"trained", b"trainex")}
    with pytest.raises(InvalidRecord, match="bad signature"):
        open_name_record("llama-x", "bot", tampered)
    forged = AdapterName("bot", "llama-x", ()).with_version("c" * 64, (), "trained", "", 3.0).sign(mallory)
    entries = [RawEntry(f"holder{i}", b"s", value, 0.0) for i, value in enumerate([second.envelope, second.envelope, forged.envelope])]
    chosen = best_name_record("llama-x", "bot", entries, Rejections())
    assert chosen.publisher == alice.peer_id and len(chosen.versions) == 2  # the record most holders carry
    store = AdapterStore(1 << 20, 1 << 20)
    store.put_name(opened)
    with pytest.raises(InvalidRequest, match="belongs to publisher"):
        store.put_name(forged)


def test_store_evicts_least_recently_used_and_bounds_each_adapter():
    adapters = [build_manifest("m", 4, 8, 0.0, False, matrices(range(2), seed)) for seed in range(3)]
    size = 2 * 2 * 4 * 16 * 4  # blocks x matrices x (4 x 16) floats x 4 bytes
    store = AdapterStore(budget_bytes=2 * size, max_adapter_bytes=size)
    for seed, manifest in enumerate(adapters[:2]):
        store.put(HeldAdapter(manifest, 0, 2, matrices(range(2), seed)))
    assert store.get(adapters[0].hash) is not None  # now the most recently used
    store.put(HeldAdapter(adapters[2], 0, 2, matrices(range(2), 2)))
    assert store.get(adapters[1].hash) is None and store.hashes() == (adapters[2].hash, adapters[0].hash)
    with pytest.raises(LimitExceeded, match="exceeds this server's limit"):
        store.check_size(size + 1)


def test_routing_prefers_the_holders_of_a_named_adapter():
    digest = "d" * 64

    def record(adapters: tuple[str, ...], rps: float) -> ServerRecord:
        return ServerRecord(ServerState.ONLINE, 0, 2, throughput=100.0, inference_rps=rps, adapters=adapters)

    blocks = [{"fast": record((), 1000.0), "holder": record((digest,), 500.0)}] * 2
    assert [hop.peer_id for hop in inference_route(blocks, 0, 2, "m")] == ["fast"]
    assert [hop.peer_id for hop in inference_route(blocks, 0, 2, "m", adapter=digest)] == ["holder"]
    assert all(forward_route(blocks, 0, 2, "m", adapter=digest)[0].peer_id == "holder" for _ in range(20))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096) | st.builds(msgpack.packb, st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=80) | st.binary(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=5), max_leaves=30)))
def test_fuzzed_manifests_and_name_records_never_crash_a_reader(payload):
    """Whatever a peer sends, the readers raise only their own errors."""
    try:
        AdapterManifest.decode(payload)
    except InvalidRequest:
        pass
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - not msgpack at all: nothing to hand the record reader
        return
    for candidate in (value, {"v": 2, "body": payload, "pk": payload[:300], "sig": payload[:256]}):
        try:
            open_name_record("llama-x", "bot", candidate)
        except InvalidRecord:
            pass
