"""Hostile DHT peers against a real swarm: poisoned, copied and forged records, a poisoned model index.

Two honest servers hold blocks 0:3 and 3:6 of a tiny llama. An attacker joins the DHT as a full peer
and stores what a hostile peer could; each test then starts a new client, which must route through
the honest servers and generate exactly the tokens of the local model. The attacker writes through
hivemind directly, as hostile code would. The attacks accumulate over the module: each must stay
harmless with the others in place.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hivemind.utils import get_dht_time
from hivemind.utils.tensor_descr import BatchTensorDescriptor
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm import dht as swarm_dht
from swarm.client.local_processes import LocalSwarm, ManagedProcess
from swarm.model_id import model_dht_prefix
from swarm.records import MODEL_INDEX_KEY, block_key

pytestmark = pytest.mark.timeout(300)

NEW_TOKENS = 12
PROMPT = torch.tensor([[5, 17, 42, 99, 7, 123, 64, 8]])
SPANS = {"0:3": (0, 3), "3:6": (3, 6)}
ATTACK_LIFETIME = 240.0  # seconds the attacker's values live: longer than this module runs
INVALID_PEER_ID = "0OIl0OIl"  # '0', 'O', 'I' and 'l' are not base58


def peer_id_of(server: ManagedProcess) -> str:
    return server.wait_for_line("serving blocks").rsplit(" as ", 1)[1].strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Attacker:
    """A full DHT peer that stores arbitrary values under arbitrary subkeys (with its own owner marker)."""

    def __init__(self, initial_peers: list[str]):
        self.dht = swarm_dht.start_dht(initial_peers)
        own = swarm_dht._own_subkey(self.dht)
        self.peer_id = swarm_dht.peer_id_of(self.dht)
        self.owner_marker = own[len(self.peer_id):]  # b"[owner:ssh-rsa ...]": only this peer may write such subkeys

    def subkey(self, peer_id: str, suffix: bytes = b"") -> bytes:
        """A subkey that names `peer_id` but belongs to the attacker (`suffix` makes another such subkey)."""
        return peer_id.encode() + self.owner_marker + suffix

    def store(self, key: str, value: object, subkey: bytes, expiration: float | None = None) -> None:
        self.dht.store(key, value, expiration or get_dht_time() + ATTACK_LIFETIME, subkey=subkey)
        assert subkey in self.read(key), "the attack did not land: the test would prove nothing"

    def read(self, key: str) -> dict:
        found = self.dht.get(key, latest=True)
        return {subkey: entry.value for subkey, entry in found.value.items()} if found is not None else {}

    def genuine(self, key: str, *peer_ids: str) -> object:
        """The value that one of these (honest) peers stored itself under `key`."""
        names = tuple(peer_id.encode() for peer_id in peer_ids)
        return next(value for sub, value in self.read(key).items() if sub.startswith(names) and self.owner_marker not in sub)

    def shutdown(self) -> None:
        self.dht.shutdown()


@pytest.fixture(scope="module")
def swarm(tiny_models) -> Iterator[tuple[LocalSwarm, Path, dict[str, tuple[int, int]]]]:
    """(swarm, model path, {honest peer id: span})."""
    path = tiny_models["llama"]
    local = LocalSwarm()
    try:
        local.start_dht()
        servers = local.start_servers(path, list(SPANS), "--num-threads", "1")
        yield local, path, {peer_id_of(server): span for server, span in zip(servers, SPANS.values())}
    finally:
        local.stop()


@pytest.fixture(scope="module")
def attacker(swarm) -> Iterator[Attacker]:
    hostile = Attacker(swarm[0].initial_peers)
    try:
        yield hostile
    finally:
        hostile.shutdown()


@pytest.fixture(scope="module")
def prefix(tiny_models) -> str:
    return model_dht_prefix(tiny_models["llama"])


@pytest.fixture(scope="module")
def expected_tokens(tiny_models) -> torch.Tensor:
    local = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    return local.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)


def assert_new_client_generates(swarm, expected_tokens) -> None:  # noqa: ANN001
    """A client that joins now routes through the honest servers only and generates the local model's tokens."""
    local, path, honest = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local.initial_peers, wire_codec="none",
                                                            route_wait=5.0)
    try:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            assert {hop.peer_id for hop in session.route} == set(honest)
            tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    finally:
        model.swarm_client.shutdown()
    assert torch.equal(tokens, expected_tokens)


def test_ext_typed_values_do_not_break_reads(swarm, attacker, prefix, expected_tokens):
    """(a) Values that hold a msgpack ext type (hivemind's tensor descriptor) under the attacker's own subkeys."""
    descriptor = BatchTensorDescriptor.from_tensor(torch.zeros(2, 3))
    for index in range(6):
        attacker.store(block_key(prefix, index), {"state": "online", "start": 0, "end": 6, "descr": descriptor},
                       attacker.subkey(attacker.peer_id))
    attacker.store(block_key(prefix, 0), descriptor, attacker.subkey(attacker.peer_id + "x"))
    assert_new_client_generates(swarm, expected_tokens)


def test_a_record_copied_under_an_invalid_peer_id_is_dropped(swarm, attacker, prefix, expected_tokens):
    """(b) An honest server's stored value, copied byte for byte under the peer id '0OIl0OIl'."""
    _, _, honest = swarm
    for index in range(6):
        key = block_key(prefix, index)
        attacker.store(key, attacker.genuine(key, *honest), attacker.subkey(INVALID_PEER_ID))
    assert_new_client_generates(swarm, expected_tokens)


def test_forged_offline_records_naming_honest_servers_are_dropped(swarm, attacker, prefix, expected_tokens):
    """(c) 'offline' records under the honest servers' peer ids, written by the attacker with its own key."""
    _, _, honest = swarm
    for peer_id, (start, end) in honest.items():
        offline = {"v": 1, "state": "offline", "start": start, "end": end, "throughput": 1.0, "codecs": ["none"]}
        for index in range(start, end):
            attacker.store(block_key(prefix, index), offline, attacker.subkey(peer_id))
    assert_new_client_generates(swarm, expected_tokens)


def test_records_signed_by_another_identity_or_tampered_are_dropped(swarm, attacker, prefix, expected_tokens, tmp_path):
    """(c, signed) The same forgeries as valid envelopes signed by the attacker's identity, or an honest one altered."""
    import msgpack
    from hivemind.p2p import P2P

    from swarm.records import RecordSigner

    P2P.generate_identity(str(tmp_path / "attacker.key"))
    signer = RecordSigner((tmp_path / "attacker.key").read_bytes())
    _, _, honest = swarm
    expires = get_dht_time() + ATTACK_LIFETIME
    for peer_id, (start, end) in honest.items():
        offline = {"state": "offline", "start": start, "end": end}
        for index in range(start, end):
            key, signed, altered = block_key(prefix, index), attacker.subkey(peer_id, b"/signed"), attacker.subkey(peer_id, b"/altered")
            genuine = attacker.genuine(key, peer_id)
            attacker.store(key, signer.seal(key, signed, expires, offline), signed, expires)
            attacker.store(key, genuine | {"body": msgpack.packb(offline)}, altered, expires)
    assert_new_client_generates(swarm, expected_tokens)


def test_subkeyless_values_cannot_replace_a_block_key(swarm, attacker, prefix, expected_tokens):
    """A value stored without a subkey, expiring later, would replace each block's whole dictionary of servers."""
    for index in range(6):
        attacker.dht.store(block_key(prefix, index), {"state": "offline"}, get_dht_time() + ATTACK_LIFETIME)
    assert_new_client_generates(swarm, expected_tokens)


def test_a_poisoned_model_index_changes_nothing(swarm, attacker, prefix, expected_tokens):
    """(d) Index entries with a huge num_blocks for the served model: the health page and clients are unaffected."""
    local, _, honest = swarm
    poisoned = {"v": 1, "dht_prefix": prefix, "num_blocks": 10_000, "model_type": "llama"}
    names = (prefix, attacker.peer_id, *honest)  # the subkey names the model, the attacker, the honest servers
    for name in names:
        attacker.store(MODEL_INDEX_KEY, poisoned, attacker.subkey(name))
    attacker.store(block_key(prefix, 0), {"state": "online", "start": 0, "end": 6}, attacker.subkey(attacker.peer_id, b"/plain"))
    url = local.start_health(free_port(), "--refresh-period", "1")
    state = json.loads(urllib.request.urlopen(url + "api/v1/state?refresh=1", timeout=60).read())
    (model,) = state["models"]
    assert (model["dht_prefix"], model["num_blocks"], model["healthy"]) == (prefix, 6, True)
    assert {server["peer_id"] for server in model["servers"]} == set(honest)
    assert state["invalid_index_records"] >= len(names) and model["invalid_count"] >= 1
    metrics = urllib.request.urlopen(url + "metrics", timeout=60).read().decode()
    assert f'swarm_blocks{{model="{prefix}"}} 6' in metrics
    assert f'swarm_invalid_records{{model="{prefix}"}} {model["invalid_count"]}' in metrics
    page = urllib.request.urlopen(url, timeout=60).read().decode()
    assert "6 blocks, 2 server(s)" in page and f"Ignored {model['invalid_count']} invalid record(s)" in page
    assert_new_client_generates(swarm, expected_tokens)
