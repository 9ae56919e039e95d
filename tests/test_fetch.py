"""Nobody needs the whole checkpoint: a client with only a model id and a server with an empty cache
fetch what they need from peers, verified against the manifest, and run with parity; wrong bytes and
peers that stop mid-tensor are survived; bad input gets an error naming the problem, and the cache
holds complete files only."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from swarm.client.local_processes import SHARED_CORES_ENV, LocalSwarm, ManagedProcess
from swarm.errors import ConfigError, InvalidRecord, RemoteError
from swarm.fetch.fetcher import _config_matches
from swarm.fetch.transfer import download
from swarm.fetch.store import StagedPart
from swarm.health.state import collect_state
from swarm.manifest import Manifest, load_manifest, tensor_sha256
from swarm.records import ServerRecord, ServerState, parts_shared, shares_of
from swarm.wire import swarm_rpc_pb2 as pb
from tests.test_manifest import only_blocks, write_manifest

pytestmark = pytest.mark.timeout(300)
PROMPT = torch.tensor([[7, 8, 9, 10, 11]])


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory) -> tuple[Path, str]:
    """(a full checkpoint with its manifest, its model id)."""
    checkpoint = tmp_path_factory.mktemp("fetch") / "llama"
    shutil.copytree(tiny_models["llama"], checkpoint)
    write_manifest(checkpoint)
    return checkpoint, load_manifest(checkpoint).model_id


@pytest.fixture(scope="module")
def expected_tokens(model) -> torch.Tensor:
    local = AutoModelForCausalLM.from_pretrained(model[0], dtype=torch.float32).eval()
    return local.generate(PROMPT, max_new_tokens=8, do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def honest_swarm(model) -> Iterator[LocalSwarm]:
    """Two servers of the full checkpoint (blocks 0:3 and 3:6); each shares every part."""
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_servers(model[0], ["0:3", "3:6"], "--num-threads", "1")
        yield swarm
    finally:
        swarm.stop()


def server(swarm: LocalSwarm, model: str | Path, blocks: str, cache: Path, *, module: str = "swarm.server.cli",
           env: dict[str, str] | None = None) -> ManagedProcess:
    """A server process with its own cache folder (SWARM_CACHE_DIR), started without waiting (and without
    measuring its throughput, which an empty cache would otherwise do)."""
    process = ManagedProcess([sys.executable, "-m", module, str(model), "--blocks", blocks, "--num-threads", "1",
                              "--throughput", "1000", "--initial-peers", *swarm.initial_peers],
                             env={**SHARED_CORES_ENV, "SWARM_CACHE_DIR": str(cache), **(env or {})})
    swarm.processes.append(process)
    return process


def cached_files(cache: Path) -> list[str]:
    """The model files in a cache folder (not its lock, nor the servers' throughput figures)."""
    return sorted(str(path.relative_to(cache / "models")) for path in (cache / "models").rglob("*") if path.is_file() and path.name != ".fetch.lock")


def generate(model_or_id: str | Path, swarm: LocalSwarm, **kwargs) -> torch.Tensor:
    remote = AutoDistributedModelForCausalLM.from_pretrained(model_or_id, initial_peers=swarm.initial_peers, wire_codec="none",
                                                             **kwargs)
    try:
        return remote.generate(PROMPT, max_new_tokens=8, do_sample=False, eos_token_id=None)
    finally:
        remote.swarm_client.shutdown()


def test_a_client_with_only_a_model_id_generates_the_same_tokens(model, expected_tokens, honest_swarm, tmp_path, monkeypatch):
    checkpoint, model_id = model
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    assert torch.equal(generate(model_id, honest_swarm), expected_tokens)
    files = cached_files(tmp_path)
    assert files == [f"{model_id}/{name}" for name in
                     ("client.safetensors", "config.json", "generation_config.json", "swarm-manifest.json")], files
    fetched = load_file(tmp_path / "models" / model_id / "client.safetensors")
    full = load_file(checkpoint / "model.safetensors")
    assert sorted(fetched) == sorted(name for name in full if not name.startswith("model.layers."))
    assert all(torch.equal(fetched[name], full[name]) for name in fetched)
    assert torch.equal(generate(model_id, honest_swarm), expected_tokens)  # again, from the cache


def test_the_health_state_shows_who_shares_the_client_part(model, honest_swarm):
    remote = AutoDistributedModelForCausalLM.from_pretrained(model[0], initial_peers=honest_swarm.initial_peers)
    try:
        (view,) = collect_state(remote.swarm_client.dht).models
    finally:
        remote.swarm_client.shutdown()
    assert view.dht_prefix == model[1]
    assert len(view.client_part_peers) == 2 and all(server.shares == ["client", "0:6"] for server in view.servers)


def test_bad_fetch_requests_get_an_error_and_the_server_keeps_sharing(model, honest_swarm):
    checkpoint, model_id = model
    remote = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=honest_swarm.initial_peers)
    client = remote.swarm_client
    try:
        peer = next(iter(run_sync(client.fetch_blocks())[0]))
        size = 64 * 4  # model.norm.weight: 64 float32

        def fetch(limit: int = 1 << 20, **what) -> bytes:
            received: list[bytes] = []
            run_sync(download(client.p2p, peer, pb.FetchRequest(**{"model_id": model_id, **what}), limit, received.append))
            return b"".join(received)

        for what, refusal in [
            (dict(model_id="llama-6x64-0123456789abcdef", manifest=True), "this server shares model"),
            (dict(file="../model.safetensors"), "is not a file this server shares"),
            (dict(file="model.safetensors"), "is not a file this server shares"),
            (dict(tensor=pb.TensorRange(name="no.such.tensor", length=4)), "does not share tensor"),
            (dict(tensor=pb.TensorRange(name="model.norm.weight", offset=size - 4, length=8)), "outside tensor model.norm.weight"),
            (dict(), "must ask for the manifest, a file or a tensor"),
        ]:
            with pytest.raises(RemoteError, match=refusal):
                fetch(**what)
        with pytest.raises(RemoteError, match="sent more than the 100 bytes asked for"):
            fetch(limit=100, tensor=pb.TensorRange(name="model.norm.weight", length=size))
        stored = load_file(checkpoint / "model.safetensors")["model.norm.weight"]
        assert fetch(tensor=pb.TensorRange(name="model.norm.weight", offset=8, length=size - 8)) == \
            stored.view(torch.uint8).numpy().tobytes()[8:]
        assert Manifest.from_json(fetch(manifest=True).decode(), "fetched").model_id == model_id  # still sharing
    finally:
        client.shutdown()


def test_a_server_with_an_empty_cache_fetches_its_blocks_around_bad_peers(model, expected_tokens, tmp_path):
    """Three servers hold the whole checkpoint: one honest, one that corrupts tensor bytes, one that stops
    halfway through every tensor. Four downloads at once go to the least busy peers, so all three are asked."""
    checkpoint, model_id = model
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        honest = swarm.start_server(checkpoint, "0:3", "--num-threads", "1", wait=False)
        liars = {lie: server(swarm, checkpoint, "0:3", tmp_path / lie, module="tests.lying_fetch_server", env={"SWARM_TEST_LIE": lie})
                 for lie in ("corrupt", "truncate")}
        honest.wait_for_line("serving blocks")
        corrupt, truncate = (liars[lie].wait_for_line("serving blocks").rsplit(" as ", 1)[1].strip() for lie in ("corrupt", "truncate"))
        fetching = server(swarm, model_id, "3:6", tmp_path / "empty")
        fetching.wait_for_line("serving blocks")
        fetching.wait_for_line(f"banned server {corrupt} for this fetch: sent bytes of tensor model.layers.")
        fetching.wait_for_line(f"server {truncate[-8:]} stopped sending tensor model.layers.")
        fetching.wait_for_line("fetched 27 tensors")
        assert f"banned server {truncate}" not in fetching.output()  # stopping early is a failure, not a lie
        assert cached_files(tmp_path / "empty") == [f"{model_id}/{name}" for name in (
            "block-00003.safetensors", "block-00004.safetensors", "block-00005.safetensors", "config.json", "swarm-manifest.json")]
        # The liars compute honestly; the route over 3:6 can only be the server that fetched its blocks.
        assert torch.equal(generate(checkpoint, swarm), expected_tokens)
    finally:
        swarm.stop()


def test_what_nobody_shares_is_named_and_nothing_half_written_stays(model, tmp_path, monkeypatch):
    """A swarm whose only server holds blocks 0:3 (and the manifest) shares neither the client part nor block 3."""
    checkpoint, model_id = model
    partial = only_blocks(checkpoint, tmp_path / "blocks-0-3", range(0, 3))
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_server(partial, "0:3", "--num-threads", "1")
        monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "client"))
        with pytest.raises(ConfigError, match=rf"no online server of model {model_id} shares the client part \(embeddings, "
                                              r"final norm, head\) \(tensors lm_head.weight, model.embed_tokens.weight, model.norm.weight\)"):
            AutoDistributedModelForCausalLM.from_pretrained(model_id, initial_peers=swarm.initial_peers)
        with pytest.raises(ConfigError, match="unknown model id llama-6x64-0123456789abcdef: no server in the swarm announces it "
                                              rf"\(models announced: {model_id}\)"):
            AutoDistributedModelForCausalLM.from_pretrained("llama-6x64-0123456789abcdef", initial_peers=swarm.initial_peers)
        assert not any(name.endswith(".safetensors") or "partial" in name for name in cached_files(tmp_path / "client"))
        fetching = server(swarm, model_id, "2:5", tmp_path / "server")
        assert fetching.popen.wait(120) == 2
        assert f"no online server of model {model_id} shares block 3 (tensors model.layers.3." in fetching.output()
        assert not any("partial" in name for name in cached_files(tmp_path / "server"))
    finally:
        swarm.stop()


def test_when_every_peer_lies_the_tensor_is_named_and_nothing_is_cached(model, tmp_path, monkeypatch):
    checkpoint, model_id = model
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        liar = server(swarm, checkpoint, "0:6", tmp_path / "liar", module="tests.lying_fetch_server", env={"SWARM_TEST_LIE": "corrupt"})
        liar.wait_for_line("serving blocks")
        monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "client"))
        with pytest.raises(ConfigError, match=r"could not fetch tensor .* of the client part .* every server sharing it failed "
                                              r"or sent wrong bytes \(banned: "):
            AutoDistributedModelForCausalLM.from_pretrained(model_id, initial_peers=swarm.initial_peers)
        assert cached_files(tmp_path / "client") == [f"{model_id}/{name}" for name in
                                                     ("config.json", "generation_config.json", "swarm-manifest.json")]
    finally:
        swarm.stop()


# --- pure pieces --------------------------------------------------------------------------------------


def test_a_staged_part_is_a_safetensors_file_and_resumes_verified_tensors(model, tmp_path):
    manifest = load_manifest(model[0])
    tensors = {name: entry for name, entry in manifest.tensors.items() if entry.part == "block:1"}
    full = load_file(model[0] / "model.safetensors")
    stage = StagedPart(tmp_path, "block:1", tensors)
    assert stage.open() == set()
    raw = {name: full[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes() for name in tensors}
    assert all(tensor_sha256(raw[name]) == entry.sha256 for name, entry in tensors.items())
    first, *rest = sorted(tensors)
    stage.write(first, 0, raw[first])
    assert StagedPart(tmp_path, "block:1", tensors).open() == {first}  # an interrupted fetch keeps what it verified
    for name in rest:
        stage.write(name, 0, raw[name][:5])
        stage.write(name, 5, raw[name][5:])
    path = stage.finish()
    assert path.name == "block-00001.safetensors" and not stage.staging.exists()
    loaded = load_file(path)
    assert sorted(loaded) == sorted(tensors) and all(torch.equal(loaded[name], full[name]) for name in tensors)


def test_a_config_that_differs_from_the_manifest_is_named(model):
    manifest = load_manifest(model[0])
    config = json.loads((model[0] / "config.json").read_text())
    assert _config_matches(json.dumps(config).encode(), manifest) is None
    assert _config_matches(json.dumps({**config, "architectures": ["X"]}).encode(), manifest) is None  # not part of the id
    assert _config_matches(json.dumps({**config, "rms_norm_eps": 0.5}).encode(), manifest) == \
        "config.json does not match the model's manifest"
    assert "not valid JSON" in _config_matches(b"{", manifest)


def test_shares_round_trip_and_malformed_ones_are_refused():
    parts = {"client", "block:0", "block:1", "block:2", "block:7"}
    assert shares_of(parts) == ("client", "0:3", "7:8")
    assert parts_shared(shares_of(parts)) == parts
    record = ServerRecord(state=ServerState.ONLINE, start=0, end=3, shares=("client", "0:3"))
    assert ServerRecord.from_wire(record.to_wire()) == record
    for bad in (["1:1"], ["0:2000"], ["a:b"], ["²:3"], ["blocks"], [3]):
        with pytest.raises(InvalidRecord):
            ServerRecord.from_wire({**record.to_wire(), "shares": bad})
