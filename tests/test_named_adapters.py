"""Adapters held by servers, published by name and used by hash: parity with local peft, and bad input.

Real processes: a DHT and three servers of the tiny llama (blocks 0:3, 3:6 and 0:6, so every block
has two holders); adapters are made with peft locally, published with the `swarm-adapter` CLI, and
used from a distributed model that carries no weights.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.adapter_files import read_peft_folder
from swarm.adapter_manifest import build_manifest
from swarm.adapter_transfer import slice_message
from swarm.client.adapter_registry import AdapterRegistry, _store
from swarm.client.adapters import HeldLora
from swarm.client.event_loop import run_sync
from swarm.client.local_processes import LocalSwarm
from swarm.errors import ConfigError, InvalidRequest
from swarm.model_id import model_dht_prefix
from swarm.wire import swarm_rpc_pb2 as pb

pytestmark = pytest.mark.timeout(600)

IDS = torch.randint(3, 211, (1, 7), generator=torch.Generator().manual_seed(3))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_adapter(path: Path, directory: Path, seed: int, **config) -> Path:  # noqa: ANN003
    """A random (non-zero) peft LoRA for the tiny model, saved in peft's format."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    options = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, LoraConfig(**{**options, **config}))
    peft_model.save_pretrained(directory)
    return directory


def local_peft(path: Path, directory: Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), directory).eval()


def cli(swarm: LocalSwarm, path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm.client.adapter_cli", *args, "--model", str(path),
                           "--initial-peers", *swarm.initial_peers], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def published(tiny_models, tmp_path_factory):
    """(path, swarm, servers, adapter folders by name, publisher key) with "alpha" and "beta" published."""
    path = tiny_models["llama"]
    root = tmp_path_factory.mktemp("adapters")
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        flags = ("--num-threads", "1", "--throughput", "100")
        local = make_adapter(path, root / "local", 6)  # held by the third server from its start
        servers = [swarm.start_server(path, blocks, *flags, *extra, wait=False)
                   for blocks, extra in (("0:3", ()), ("3:6", ()), ("0:6", ("--max-adapter-mb", "1", "--adapters", str(local))))]
        for server in servers:
            server.wait_for_line("serving blocks")
        folders = {"alpha": make_adapter(path, root / "alpha", 1), "beta": make_adapter(path, root / "beta", 2, r=8),
                   "gamma": make_adapter(path, root / "gamma", 4), "local": local}
        key = root / "publisher.key"
        for name, folder in folders.items():
            if name == "local":
                continue
            done = cli(swarm, path, "publish", str(folder), "--name", name, "--identity-path", str(key),
                       "--provenance", f"test data for {name}")
            assert done.returncode == 0, done.stderr
            assert f"published {name}@1" in done.stdout
        yield path, swarm, servers, folders, key
    finally:
        swarm.stop()


def remote_model(path: Path, swarm: LocalSwarm, **kwargs):  # noqa: ANN003, ANN201
    return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, wire_codec="none", **kwargs)


def test_named_adapter_logits_equal_local_peft(published):
    path, swarm, servers, folders, _ = published
    remote = remote_model(path, swarm)
    try:
        remote.load_adapter("swarm:alpha", adapter_name="a")
        assert list(remote.swarm_adapters["a"].parameters()) == []  # no weights on the client
        with torch.no_grad():
            expected = local_peft(path, folders["alpha"])(IDS).logits
            base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(IDS).logits
            torch.testing.assert_close(remote(IDS).logits, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(expected, base, atol=1e-3)  # the adapter changes the logits
        message = remote.request_adapter().message(0, 3)
        assert message.adapter_hash and not message.lora
    finally:
        remote.swarm_client.shutdown()


def test_two_sessions_with_different_adapters_at_once(published):
    path, swarm, servers, folders, _ = published
    remote = remote_model(path, swarm)
    try:
        remote.load_adapter("swarm:alpha", adapter_name="a")
        remote.load_adapter("swarm:beta", adapter_name="b")
        expected = {name: local_peft(path, folders[name]).generate(IDS, max_new_tokens=6, do_sample=False) for name in ("alpha", "beta")}
        outputs: dict[str, torch.Tensor] = {}
        opened = threading.Event()

        def generate_with_beta() -> None:
            with remote.inference_session(max_length=20):
                opened.set()
                outputs["beta"] = remote.generate(IDS, max_new_tokens=6, do_sample=False)

        remote.set_adapter("a")
        with remote.inference_session(max_length=20):
            remote.set_adapter("b")  # the open session keeps "a"; the thread's session opens with "b"
            thread = threading.Thread(target=generate_with_beta)
            thread.start()
            assert opened.wait(60)
            outputs["alpha"] = remote.generate(IDS, max_new_tokens=6, do_sample=False)
            thread.join(120)
        for name in expected:
            assert torch.equal(outputs[name], expected[name]), name
        assert not torch.equal(expected["alpha"], expected["beta"])
    finally:
        remote.swarm_client.shutdown()


def test_list_log_pull_and_health_page(published, tmp_path):
    path, swarm, servers, folders, _ = published
    url = swarm.start_health(free_port(), "--refresh-period", "1")
    state = json.loads(urllib.request.urlopen(url + "api/v1/state?refresh=1", timeout=30).read())
    (model,) = state["models"]
    adapters = {adapter["name"]: adapter for adapter in model["adapters"]}
    assert set(adapters) >= {"alpha", "beta"}
    first = adapters["beta"]["versions"][-1]
    assert first["version"] == 1 and first["provenance"] == "test data for beta"
    assert len(first["holders"]) >= 2 and min(first["coverage"]) >= 2  # two holders of every block
    assert "beta" in urllib.request.urlopen(url, timeout=30).read().decode()
    listed = cli(swarm, path, "list")
    assert listed.returncode == 0, listed.stderr
    assert "alpha@1" in listed.stdout and "beta@1" in listed.stdout
    log = cli(swarm, path, "log", "alpha")
    assert "provenance: test data for alpha" in log.stdout
    pulled = cli(swarm, path, "pull", "beta@1", str(tmp_path / "beta"))
    assert pulled.returncode == 0, pulled.stderr
    with torch.no_grad():
        torch.testing.assert_close(local_peft(path, tmp_path / "beta")(IDS).logits, local_peft(path, folders["beta"])(IDS).logits)


@pytest.mark.parametrize("method, specs, density", [("ties", ["alpha@1", "gamma"], "0.5"), ("svd", ["alpha@1", "beta"], None)])
def test_merge_equals_peft_add_weighted_adapter(published, method, specs, density):
    path, swarm, servers, folders, key = published
    extra = ["--density", density] if density else []
    done = cli(swarm, path, "merge", *specs, "--method", method, "--weights", "0.7", "0.5", *extra, "--name", f"mix-{method}",
               "--identity-path", str(key))
    assert done.returncode == 0, done.stderr
    local = local_peft(path, folders["alpha"])
    local.load_adapter(str(folders[specs[1]]), adapter_name="other")
    local.add_weighted_adapter(["default", "other"], [0.7, 0.5], "merged", combination_type=method,
                               **({"density": float(density)} if density else {}))
    local.set_adapter("merged")
    remote = remote_model(path, swarm)
    try:
        remote.load_adapter(f"swarm:mix-{method}", adapter_name="mix")
        with torch.no_grad():
            torch.testing.assert_close(remote(IDS).logits, local(IDS).logits, atol=1e-4, rtol=1e-4)
        record = AdapterRegistry(remote.swarm_client).record(f"mix-{method}")
        parents = tuple(AdapterRegistry(remote.swarm_client).resolve(spec)[1].hash for spec in specs)
        assert record.latest().parents == parents and record.latest().method.startswith(f"merge {method}")
    finally:
        remote.swarm_client.shutdown()


def test_trainable_fork_and_new_version(published):
    path, swarm, servers, folders, key = published
    remote = remote_model(path, swarm)
    try:
        remote.load_adapter("swarm:alpha", adapter_name="fork", is_trainable=True)
        lora = remote.swarm_adapters["fork"]
        assert all(p.requires_grad for p in lora.parameters())
        with torch.no_grad():
            torch.testing.assert_close(remote(IDS).logits, local_peft(path, folders["alpha"])(IDS).logits, atol=1e-4, rtol=1e-4)
            for p in lora.parameters():
                p.add_(0.01)
        version = remote.publish_adapter("alpha", provenance="fine-tuned further", identity_path=key)
        record = AdapterRegistry(remote.swarm_client).record("alpha")
        assert version.version == 2 and record.latest() == version
        assert version.parents == (record.version(1).hash,)
    finally:
        remote.swarm_client.shutdown()


def test_server_joining_later_fetches_its_slice(published):
    path, swarm, servers, folders, _ = published
    late = swarm.start_server(path, "0:6", "--num-threads", "1", "--throughput", "100")
    peer = late.wait_for_line("serving blocks").rsplit(" as ", 1)[1].strip()
    remote = remote_model(path, swarm, allowed_servers=[peer])
    try:
        remote.load_adapter("swarm:beta", adapter_name="b")
        with torch.no_grad():
            torch.testing.assert_close(remote(IDS).logits, local_peft(path, folders["beta"])(IDS).logits, atol=1e-4, rtol=1e-4)
        late.wait_for_line("fetched adapter", timeout=10)
    finally:
        remote.swarm_client.shutdown()


def test_adapter_loaded_with_the_server_is_fetched_by_the_others(published):
    path, swarm, servers, folders, _ = published
    digest = read_peft_folder(folders["local"], model_dht_prefix(path), "model.layers.", 1 << 30)[0].hash
    others = [server.wait_for_line("serving blocks").rsplit(" as ", 1)[1].strip() for server in servers[:2]]
    remote = remote_model(path, swarm, allowed_servers=others)  # neither holds it: both fetch their blocks from the third
    try:
        remote._register_adapter("local", HeldLora("local", digest), trainable=False)
        with torch.no_grad():
            torch.testing.assert_close(remote(IDS).logits, local_peft(path, folders["local"])(IDS).logits, atol=1e-4, rtol=1e-4)
        for server in servers[:2]:
            server.wait_for_line(f"fetched adapter {digest[:12]}", timeout=10)
    finally:
        remote.swarm_client.shutdown()


def test_bad_input_gets_clear_errors_and_the_servers_keep_serving(published, tmp_path):
    path, swarm, servers, folders, key = published
    remote = remote_model(path, swarm)
    try:
        with pytest.raises(ConfigError, match="no adapter named 'nobody'"):
            remote.load_adapter("swarm:nobody")
        with pytest.raises(InvalidRequest, match="has no version 9"):
            remote.load_adapter("swarm:alpha@9")
        # a name another key owns
        other = cli(swarm, path, "publish", str(folders["beta"]), "--name", "alpha", "--identity-path", str(tmp_path / "other.key"))
        assert other.returncode != 0 and "belongs to publisher" in other.stderr
        # a rank over the servers' --max-lora-rank (64)
        big = cli(swarm, path, "publish", str(make_adapter(path, tmp_path / "big", 3, r=96)), "--name", "big",
                  "--identity-path", str(key))
        assert big.returncode != 0 and "rank 96 exceeds" in big.stderr
        registry = AdapterRegistry(remote.swarm_client)
        assert registry.record("big") is None
        # slices pushed by hand: another base model, a module the blocks lack, a corrupted tensor
        prefix = model_dht_prefix(path)
        good = {f"{b}.self_attn.q_proj.{k}": torch.randn(*((4, 64) if k == "lora_A" else (64, 4))) for b in range(3) for k in ("lora_A", "lora_B")}
        peer = next(iter(registry.holders(registry.record("alpha").latest().hash)))
        cases = {
            "is for base model": (build_manifest("llama-other", 4, 8.0, 0.0, False, good), good),
            "has no module": (build_manifest(prefix, 4, 8.0, 0.0, False, {n.replace("q_proj", "nope"): t for n, t in good.items()}), None),
            "does not match its hash": (build_manifest(prefix, 4, 8.0, 0.0, False, good), {**good, "0.self_attn.q_proj.lora_A": torch.zeros(4, 64)}),
        }
        for message, (manifest, tensors) in cases.items():
            tensors = tensors if tensors is not None else {n.replace("q_proj", "nope"): t for n, t in good.items()}
            request = pb.AdapterStoreRequest(slice=slice_message(manifest, tensors, 0, 3))
            with pytest.raises(InvalidRequest, match=message):
                run_sync(_store(remote.swarm_client.p2p, peer, request))
            assert not registry.holders(manifest.hash)  # nothing stored
        # an oversized slice: the third server takes at most 1 MiB per adapter, this one is 1.5 MiB
        big_manifest, big_tensors = read_peft_folder(make_adapter(path, tmp_path / "huge", 5, r=64, target_modules="all-linear"),
                                                     prefix, "model.layers.", 1 << 30)
        small_server = servers[2].wait_for_line("serving blocks").rsplit(" as ", 1)[1].strip()
        request = pb.AdapterStoreRequest(slice=slice_message(big_manifest, big_tensors, 0, 6))
        with pytest.raises(InvalidRequest, match="exceeds this server's limit of 1048576 bytes"):
            run_sync(_store(remote.swarm_client.p2p, small_server, request))
        assert not registry.holders(big_manifest.hash)
        # a request naming a hash nobody holds
        remote.load_adapter("swarm:alpha", adapter_name="a")
        remote.swarm_adapters["a"].held_hash = "0" * 64
        with pytest.raises(InvalidRequest, match="no server holds adapter 000000000000"):
            remote(IDS)
        # and the servers still serve the real one
        remote.swarm_adapters["a"].held_hash = registry.record("alpha").version(1).hash
        with torch.no_grad():
            torch.testing.assert_close(remote(IDS).logits, local_peft(path, folders["alpha"])(IDS).logits, atol=1e-4, rtol=1e-4)
    finally:
        remote.swarm_client.shutdown()
