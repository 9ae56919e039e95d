"""Routing among published adapters: Arrow on the servers equals peft's Arrow locally; the prompt router
picks what a local computation of its score picks and then equals that adapter's local peft; bad input.

Real processes: a DHT and two servers of the tiny llama (blocks 0:3 and 3:6); adapters are made with
peft locally and published from a distributed model, which then routes among them by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import ArrowConfig, LoraConfig, PeftModel, create_arrow_model, get_peft_model
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.adapter_manifest import AdapterManifest, TensorDigest
from swarm.adapter_routing import ARROW_SEED, MAX_ROUTED_ADAPTERS, check_routable, check_top_k
from swarm.client.adapter_registry import AdapterRegistry
from swarm.client.adapter_router import RoutedLora, checked_scores
from swarm.client.adapters import RequestAdapter
from swarm.client.event_loop import run_sync
from swarm.client.local_processes import LocalSwarm
from swarm.client.remote_calls import forward_hop
from swarm.errors import ConfigError, InvalidRequest, RemoteError
from swarm.wire import swarm_rpc_pb2 as pb

pytestmark = pytest.mark.timeout(600)

TASKS = ("alpha", "beta", "gamma")
TARGETS = ["q_proj", "v_proj", "down_proj"]
PROMPTS = [torch.randint(3, 211, (1, 7), generator=torch.Generator().manual_seed(seed)) for seed in (3, 4, 5)]


# --- pure pieces ---------------------------------------------------------------------------------------


def manifest(rank: int = 4, modules: tuple[str, ...] = ("self_attn.q_proj",), base: str = "m", seed: str = "0") -> AdapterManifest:
    tensors = {}
    for block in range(2):
        for path in modules:
            tensors[f"{block}.{path}.lora_A"] = TensorDigest((rank, 8), seed * 64)
            tensors[f"{block}.{path}.lora_B"] = TensorDigest((8, rank), seed * 64)
    return AdapterManifest(base, rank, 8.0, 0.0, False, tensors)


def test_check_routable_names_the_problem():
    a, b = manifest(seed="a"), manifest(seed="b")
    check_routable([a, b], ["a", "b"])
    with pytest.raises(InvalidRequest, match="different ranks: b has rank 8"):
        check_routable([a, manifest(rank=8, seed="b")], ["a", "b"])
    with pytest.raises(InvalidRequest, match="different target modules: b adds block 0 self_attn.v_proj"):
        check_routable([a, manifest(modules=("self_attn.q_proj", "self_attn.v_proj"), seed="b")], ["a", "b"])
    with pytest.raises(InvalidRequest, match="base model other"):
        check_routable([a, manifest(base="other", seed="b")], ["a", "b"])
    with pytest.raises(InvalidRequest, match="b is the same adapter as a"):
        check_routable([a, manifest(seed="a")], ["a", "b"])
    with pytest.raises(InvalidRequest, match=f"2..{MAX_ROUTED_ADAPTERS} adapters, got 1"):
        check_routable([a], ["a"])
    many = [manifest(seed=f"{i:x}") for i in range(MAX_ROUTED_ADAPTERS + 1)]
    with pytest.raises(InvalidRequest, match=f"got {MAX_ROUTED_ADAPTERS + 1}"):
        check_routable(many, [str(i) for i in range(len(many))])
    check_top_k(3, 3)
    for bad in (0, 4):
        with pytest.raises(InvalidRequest, match="top_k must be between 1 and the number of adapters"):
            check_top_k(bad, 3)


def test_checked_scores_bound_what_a_server_sends():
    assert checked_scores("p", [0.0, 2.5], 2, 3).tolist() == [0.0, 2.5]
    for scores in ([1.0], [1.0, 2.0, 3.0], [1.0, float("nan")], [-0.1, 1.0], [1.0, 3.5]):
        with pytest.raises(RemoteError):
            checked_scores("p", scores, 2, 3)


def test_routed_lora_names_every_adapter():
    message = pb.Adapter()
    RoutedLora(["swarm:a", "swarm:b"], ["1" * 64, "2" * 64], 2).fill(message, 0, 3)
    assert list(message.arrow_hashes) == ["1" * 64, "2" * 64] and message.arrow_top_k == 2 and not message.arrow_score
    assert not message.adapter_hash and not message.lora


# --- through the swarm ------------------------------------------------------------------------------------


def make_adapter(path: Path, directory: Path, seed: int, **config) -> Path:  # noqa: ANN003
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    options = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(base, LoraConfig(**{**options, **config})).save_pretrained(directory)
    return directory


def remote_model(path: Path, swarm: LocalSwarm):  # noqa: ANN201
    return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, wire_codec="none")


@pytest.fixture(scope="module")
def published(tiny_models, tmp_path_factory):
    """(path, swarm, adapter folders by name) with every folder published under its name."""
    path = tiny_models["llama"]
    root = tmp_path_factory.mktemp("routed")
    swarm = LocalSwarm()
    remote = None
    try:
        swarm.start_dht()
        swarm.start_servers(path, ["0:3", "3:6"], "--num-threads", "1", "--throughput", "100")
        folders = {name: make_adapter(path, root / name, seed) for seed, name in enumerate(TASKS)}
        folders["wide"] = make_adapter(path, root / "wide", 7, r=8)
        folders["narrow"] = make_adapter(path, root / "narrow", 8, target_modules=["q_proj"])
        remote = remote_model(path, swarm)
        for name, folder in folders.items():
            remote.load_adapter(str(folder), adapter_name=name)
            remote.publish_adapter(name, adapter_name=name, identity_path=root / "publisher.key")
        yield path, swarm, folders
    finally:
        if remote is not None:
            remote.swarm_client.shutdown()
        swarm.stop()


@pytest.fixture(scope="module")
def local_arrow(published):
    """peft's Arrow over the task adapters, top_k=2, prototypes seeded as the servers seed them."""
    path, _, folders = published
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = ArrowConfig(top_k=2, rng_seed=ARROW_SEED)
    return create_arrow_model(base, [str(folders[name]) for name in TASKS], config).eval()


@pytest.fixture
def remote(published):
    path, swarm, _ = published
    model = remote_model(path, swarm)
    try:
        yield model
    finally:
        model.swarm_client.shutdown()


def test_arrow_through_the_swarm_equals_peft_arrow(published, local_arrow, remote):
    path, _, folders = published
    remote.set_adapter_router([f"swarm:{name}" for name in TASKS], method="arrow", top_k=2)
    with torch.no_grad():
        expected = local_arrow(PROMPTS[0]).logits
        torch.testing.assert_close(remote(PROMPTS[0]).logits, expected, atol=1e-4, rtol=1e-4)
        single = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), folders["alpha"])
        assert not torch.allclose(expected, single(PROMPTS[0]).logits, atol=1e-3)  # a mix, not one adapter
    tokens = remote.generate(PROMPTS[0], max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, local_arrow.generate(input_ids=PROMPTS[0], max_new_tokens=6, do_sample=False))
    remote.clear_adapter_router()
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(PROMPTS[0]).logits
        torch.testing.assert_close(remote(PROMPTS[0]).logits, base, atol=1e-4, rtol=1e-4)


def local_scores(local_arrow: torch.nn.Module, ids: torch.Tensor, blocks: int) -> torch.Tensor:
    """The prompt router's score computed locally: mean |cos| of the base model's inputs to every target
    layer of the first `blocks` blocks with that layer's Arrow prototypes, as peft computed them."""
    sums, count, handles = torch.zeros(len(TASKS), dtype=torch.float64), 0, []

    def hook(module, args, output):  # noqa: ANN001, ANN202
        nonlocal sums, count
        tokens = args[0].reshape(-1, args[0].shape[-1]).double()
        prototypes = module.lora_arrow["arrow_router"].prototypes.double()
        sums = sums + (tokens / tokens.norm(dim=-1, keepdim=True) @ prototypes.T).abs().sum(0)
        count += tokens.shape[0]

    for name, module in local_arrow.named_modules():
        if hasattr(module, "lora_arrow") and int(name.split("layers.")[1].split(".")[0]) < blocks:
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad(), local_arrow.disable_adapter():
        local_arrow(ids)
    for handle in handles:
        handle.remove()
    return sums / count


def test_prompt_router_picks_what_its_score_picks_locally_and_equals_that_adapter(published, local_arrow, remote):
    path, _, folders = published
    with torch.no_grad():
        local_arrow(PROMPTS[0])  # peft builds its prototypes at the first Arrow forward
    remote.set_adapter_router([f"swarm:{name}" for name in TASKS], method="prompt")
    router = remote.adapter_router
    picked = set()
    for ids in PROMPTS:
        expected_scores = local_scores(local_arrow, ids, router.prompt_blocks)
        with torch.no_grad():
            scores = router.scores(remote.swarm_client, remote.get_input_embeddings()(ids), None)
        torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=1e-5)
        name = TASKS[int(torch.argmax(expected_scores))]
        assert remote.route_adapter(ids) == f"swarm:{name}"
        picked.add(name)
        local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), folders[name]).eval()
        with torch.no_grad():
            torch.testing.assert_close(remote(ids).logits, local(ids).logits, atol=1e-4, rtol=1e-4)
        tokens = remote.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(tokens, local.generate(input_ids=ids, max_new_tokens=5, do_sample=False)), name
    assert len(picked) > 1  # the prompts are routed to different adapters: the choice is not a constant
    with pytest.raises(InvalidRequest, match="chooses an adapter per prompt"):
        with remote.inference_session(max_length=16):
            pass


def test_bad_router_input_gets_clear_errors(published, remote):
    tasks = [f"swarm:{name}" for name in TASKS]
    cases = [
        (["swarm:alpha", "swarm:nobody"], {}, ConfigError, "no adapter named 'nobody'"),
        (["swarm:alpha", "swarm:wide"], {}, InvalidRequest, "different ranks: swarm:wide has rank 8"),
        (["swarm:alpha", "swarm:narrow"], {}, InvalidRequest, "different target modules: swarm:narrow adds nothing and lacks"),
        (["swarm:alpha"], {}, InvalidRequest, "2..16 adapters, got 1"),
        (["swarm:alpha", "swarm:alpha@1"], {}, InvalidRequest, "the same adapter"),
        (["swarm:alpha", "alpha-folder"], {}, ConfigError, "not a published adapter"),
        (tasks, {"top_k": 4}, InvalidRequest, "top_k must be between 1 and the number of adapters"),
        (tasks, {"top_k": 0}, InvalidRequest, "top_k must be between"),
        (tasks, {"method": "prompt", "top_k": 2}, ConfigError, "top_k must be 1"),
        (tasks, {"method": "oracle"}, ConfigError, "method must be one of arrow, prompt"),
        ("swarm:alpha", {}, ConfigError, "names must be a list"),
    ]
    for names, options, error, message in cases:
        with pytest.raises(error, match=message):
            remote.set_adapter_router(names, **options)
        assert remote.adapter_router is None


def test_server_refuses_sets_arrow_cannot_combine_and_keeps_serving(published, remote):
    registry_hashes = {}
    registry = AdapterRegistry(remote.swarm_client)
    for name in ("alpha", "beta", "wide"):
        registry_hashes[name] = registry.resolve(f"swarm:{name}")[1].hash
    client = remote.swarm_client
    hidden = torch.randn(1, 4, remote.config.hidden_size)
    (hop,) = run_sync(client.forward_route(0, 3, 4))
    bad = [
        (RoutedLora(["a", "w"], [registry_hashes["alpha"], registry_hashes["wide"]], 1), "different ranks"),
        (RoutedLora(["a", "b"], [registry_hashes["alpha"], registry_hashes["beta"]], 3), "top_k must be between"),
        (RoutedLora(["a", "x"], [registry_hashes["alpha"], "0" * 64], 1), "no server holds adapter 000000000000"),
    ]
    for payload, message in bad:
        with pytest.raises(Exception, match=message):
            run_sync(forward_hop(client, hop, hidden, RequestAdapter(payload, None)))
    good = RoutedLora(["a", "b"], [registry_hashes["alpha"], registry_hashes["beta"]], 1)
    output, reply = run_sync(forward_hop(client, hop, hidden, RequestAdapter(good, None)))
    assert output.shape == hidden.shape and not reply.adapter_scores
