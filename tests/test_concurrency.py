"""One model, many callers: generate() and forward from several threads and asyncio tasks at once,
each with its own session unless it opened one, every result equal to local transformers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.conftest import local_and_remote

pytestmark = pytest.mark.timeout(300)

PROMPTS = [torch.randint(3, 211, (1, 5 + index), generator=torch.Generator().manual_seed(index)) for index in range(4)]


@pytest.fixture(scope="module")
def models(tiny_models) -> Iterator[tuple[torch.nn.Module, torch.nn.Module]]:
    with local_and_remote(tiny_models["llama"]) as pair:
        yield pair


def expected(local: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
    return local.generate(prompt, max_new_tokens=tokens, do_sample=False, eos_token_id=None)


def test_threads_generate_and_forward_at_once(models):
    local, remote = models
    start = threading.Barrier(len(PROMPTS) + 1)

    def generate(prompt: torch.Tensor) -> torch.Tensor:
        start.wait()
        return remote.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)

    def forward() -> torch.Tensor:
        start.wait()
        with torch.no_grad():
            return remote(PROMPTS[0]).logits

    with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        generated = [pool.submit(generate, prompt) for prompt in PROMPTS]
        logits = pool.submit(forward)
        for prompt, future in zip(PROMPTS, generated):
            assert torch.equal(future.result(), expected(local, prompt, 10))
        with torch.no_grad():
            torch.testing.assert_close(logits.result(), local(PROMPTS[0]).logits, atol=1e-4, rtol=0)


def test_an_open_session_belongs_to_its_thread(models):
    local, remote = models
    inside = threading.Event()
    other_done = threading.Event()
    results = {}

    def with_session() -> None:
        with remote.inference_session(max_length=64) as session:
            first = remote.generate(PROMPTS[1], max_new_tokens=4, do_sample=False, eos_token_id=None)
            inside.set()
            assert other_done.wait(60)
            results["continued"] = remote.generate(None, max_new_tokens=4, do_sample=False, eos_token_id=None)
            results["position"] = session.position
            results["first"] = first

    def without_session() -> None:
        assert inside.wait(60)
        assert remote.route == []  # the other thread's session is not this thread's
        results["other"] = remote.generate(PROMPTS[2], max_new_tokens=6, do_sample=False, eos_token_id=None)
        other_done.set()

    threads = [threading.Thread(target=with_session), threading.Thread(target=without_session)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert torch.equal(results["continued"], expected(local, PROMPTS[1], 8))
    assert results["position"] == PROMPTS[1].shape[1] + 8 - 1  # the other thread's tokens never entered it
    assert torch.equal(results["other"], expected(local, PROMPTS[2], 6))


def test_asyncio_tasks_generate_concurrently(models):
    local, remote = models

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(*(
            remote.agenerate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None) for prompt in PROMPTS
        ))

    for prompt, produced in zip(PROMPTS, asyncio.run(main())):
        assert torch.equal(produced, expected(local, prompt, 6))
