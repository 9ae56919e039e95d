"""swarm-api, driven by the official `openai` package: chat and completions, streaming or not,
sampling parameters, logprobs, many concurrent requests, errors in OpenAI's format, API keys, and a
client that disconnects mid-stream (its session closes on every server at once).

The model is a tiny random Llama that carries the default model's tokenizer (and chat template), so
the API's text can be compared with local transformers' at fp32 on an uncompressed wire.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from swarm.client.event_loop import run_sync
from swarm.client.local_processes import LocalSwarm, ManagedProcess
from swarm.client.swarm_client import SwarmClient
from swarm.model_id import model_dht_prefix
from swarm.model_source import resolve_model
from swarm.transport import call_unary
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.rpc import RPC_INFO

pytestmark = pytest.mark.timeout(300)

KEY = "sk-test-key"
CACHE_TOKENS = 4096
NAME = "tiny-chat"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, saved like any checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    directory = tmp_path_factory.mktemp("chat-model")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def api(chat_model: Path) -> Iterator[tuple[str, LocalSwarm]]:
    """swarm-api (with an API key) over two servers of the chat model: (base URL, swarm)."""
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_servers(chat_model, ["0:2", "2:4"], "--num-threads", "1", "--attn-cache-tokens", str(CACHE_TOKENS))
        port = free_port()
        process = ManagedProcess([sys.executable, "-m", "swarm.client.api_cli", str(chat_model), "--model-name", NAME,
                                  "--initial-peers", *swarm.initial_peers, "--port", str(port), "--api-key", KEY,
                                  "--wire-codec", "none"])
        swarm.processes.append(process)
        process.wait_for_line("OpenAI-compatible API at")
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        while True:  # uvicorn binds just after that line
            try:
                openai.OpenAI(base_url=url, api_key=KEY).models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, process.output()
                time.sleep(0.2)
        yield url, swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api[0], api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(chat_model):
    return AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(chat_model)


def local_chat(local, content: str, max_tokens: int) -> str:
    model, tokenizer = local
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == [NAME]


def test_chat_equals_local_transformers(client, local):
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == local_chat(local, "Hello there", 10)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 10 and reply.usage.prompt_tokens > 0


def test_streaming_chat_gives_the_same_text(client, local):
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Stream me"}],
                                            max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == local_chat(local, "Stream me", 10)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_completions_with_logprobs_stop_and_n(client, local):
    reply = client.completions.create(model=NAME, prompt="The weather today", max_tokens=6, temperature=0, logprobs=3)
    choice = reply.choices[0]
    assert len(choice.logprobs.tokens) == reply.usage.completion_tokens == len(choice.logprobs.token_logprobs)
    assert all(len(top) == 3 for top in choice.logprobs.top_logprobs)
    assert all(value <= 0 for value in choice.logprobs.token_logprobs)

    cut = choice.text[2:4] if len(choice.text) >= 4 else None
    if cut:
        stopped = client.completions.create(model=NAME, prompt="The weather today", max_tokens=6, temperature=0, stop=[cut])
        assert stopped.choices[0].text == choice.text[: choice.text.index(cut)]
        assert stopped.choices[0].finish_reason == "stop"

    sampled = client.completions.create(model=NAME, prompt="Once", max_tokens=5, temperature=0.9, top_p=0.9, n=2, seed=7)
    again = client.completions.create(model=NAME, prompt="Once", max_tokens=5, temperature=0.9, top_p=0.9, n=2, seed=7)
    assert len(sampled.choices) == 2 and [c.text for c in sampled.choices] == [c.text for c in again.choices]


def test_eight_concurrent_requests(client, local):
    prompts = [f"Request number {index}" for index in range(8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": p}], max_tokens=6, temperature=0), prompts))
    for prompt, reply in zip(prompts, replies):
        assert reply.choices[0].message.content == local_chat(local, prompt, 6)


def test_errors_in_openai_format(client, api):
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-9' does not exist"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], temperature=5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api[0], api_key="wrong", max_retries=0).models.list()

    request = urllib.request.Request(f"{api[0]}/chat/completions", data=b"{not json", method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    error = json.loads(caught.value.read())["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def cache_left(swarm: LocalSwarm, model: Path) -> list[int]:
    peer_client = SwarmClient(swarm.initial_peers, model_dht_prefix(model), 4)
    peer_client.start()
    try:
        peers = {peer for servers in run_sync(peer_client.fetch_blocks()) for peer in servers}
        infos = [run_sync(call_unary(peer_client.p2p, peer, RPC_INFO, pb.InfoRequest(), pb.InfoResponse, 10.0)) for peer in peers]
        return [info.cache_tokens_left for info in infos]
    finally:
        peer_client.shutdown()


def test_a_client_that_leaves_mid_stream_frees_its_sessions(client, api, chat_model):
    _, swarm = api
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "A long story"}],
                                            max_tokens=400, temperature=0, stream=True)
    for index, _ in enumerate(stream):
        if index == 3:
            break
    stream.close()  # the HTTP connection goes away mid-generation
    deadline = time.monotonic() + 20
    while (left := cache_left(swarm, chat_model)) != [CACHE_TOKENS, CACHE_TOKENS]:
        assert time.monotonic() < deadline, f"sessions still open on the servers: {left}"
        time.sleep(0.5)
