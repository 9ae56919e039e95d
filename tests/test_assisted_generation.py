"""Assisted generation through the swarm: a draft (prompt lookup, or a small local assistant model)
is verified in one pass through the chain, the rejected part is rolled back on the servers, and the
tokens are exactly greedy decoding's, in fewer inference steps than tokens (the servers' own counts).

A rollback that did not reach the servers would leave rejected tokens' keys and values in their
caches, and every later token would see them: the exact-token checks below fail then, which is
why each test also makes sure that drafts were in fact rejected.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.client.inference_session import InferenceSession
from swarm.client.remote_sequential import RemoteCache
from swarm.errors import InvalidRequest
from tests.conftest import local_and_remote, save_tiny_model, served_counts

pytestmark = pytest.mark.timeout(240)

NEW_TOKENS = 30


@pytest.fixture(scope="module")
def llama_swarm(tiny_models) -> Iterator[tuple[torch.nn.Module, torch.nn.Module]]:
    with local_and_remote(tiny_models["llama"]) as models:
        yield models


@pytest.fixture
def rolled_back(monkeypatch) -> list[int]:
    """Counts of draft tokens dropped by each RemoteCache.crop (the real crop still runs)."""
    dropped: list[int] = []
    crop = RemoteCache.crop

    def counting_crop(self, tokens_to_remove: int) -> None:
        dropped.append(-tokens_to_remove)
        crop(self, tokens_to_remove)

    monkeypatch.setattr(RemoteCache, "crop", counting_crop)
    return dropped


def repetitive_prompt(seed: int) -> torch.Tensor:
    """A prompt that repeats itself, so that prompt lookup finds drafts (some right, some wrong)."""
    base = torch.randint(3, 211, (1, 6), generator=torch.Generator().manual_seed(seed))
    return torch.cat([base, base, base[:, :3]], dim=1)


def inference_steps(remote: torch.nn.Module, action) -> tuple[torch.Tensor, dict[str, int]]:  # noqa: ANN001
    before = served_counts(remote)
    output = action()
    after = served_counts(remote)
    return output, {peer: after[peer].inference_steps - before[peer].inference_steps for peer in before}


def greedy(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int = NEW_TOKENS, **kwargs) -> torch.Tensor:
    return model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, **kwargs)


@pytest.mark.parametrize("seed", [0, 3])
def test_prompt_lookup_gives_greedy_tokens_in_fewer_steps(llama_swarm, rolled_back, seed):
    local, remote = llama_swarm
    input_ids = repetitive_prompt(seed)
    expected = greedy(local, input_ids)
    produced, steps = inference_steps(remote, lambda: greedy(remote, input_ids, prompt_lookup_num_tokens=5))
    assert torch.equal(produced, expected)
    assert torch.equal(greedy(remote, input_ids), expected)  # and plain greedy through the swarm agrees
    assert len(steps) == 2 and all(0 < count < NEW_TOKENS for count in steps.values()), steps
    assert sum(rolled_back) > 0, "no draft token was rejected: the rollback went untested"


def test_assistant_model_gives_greedy_tokens_in_fewer_steps(llama_swarm, rolled_back, tiny_models):
    local, remote = llama_swarm
    # An assistant that is often wrong: the same architecture with other random weights.
    assistant_path = save_tiny_model("llama", tiny_models["llama"].parent / "assistant", seed=1)
    assistant = AutoModelForCausalLM.from_pretrained(assistant_path, dtype=torch.float32).eval()
    assistant.generation_config.assistant_confidence_threshold = 0.0  # draft even when unsure
    input_ids = repetitive_prompt(1)
    expected = greedy(local, input_ids)
    produced, steps = inference_steps(remote, lambda: greedy(remote, input_ids, assistant_model=assistant))
    assert torch.equal(produced, expected)
    assert sum(rolled_back) > 0, "the assistant's drafts were never rejected: the rollback went untested"
    # The model itself as its own assistant: every draft is right, so steps are far fewer than tokens.
    local.generation_config.assistant_confidence_threshold = 0.0
    produced, steps = inference_steps(remote, lambda: greedy(remote, input_ids, assistant_model=local))
    assert torch.equal(produced, expected)
    assert all(0 < count <= NEW_TOKENS // 2 for count in steps.values()), steps


def test_assisted_generation_continues_a_session(llama_swarm):
    """Inside inference_session(): plain and assisted calls alternate over one server-side session."""
    local, remote = llama_swarm
    input_ids = repetitive_prompt(0)
    expected = greedy(local, input_ids, new_tokens=24)
    with remote.inference_session(max_length=64):
        first = greedy(remote, input_ids, new_tokens=8)
        second = remote.generate(None, max_new_tokens=8, do_sample=False, eos_token_id=None, prompt_lookup_num_tokens=5)
        third = remote.generate(None, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(first, expected[:, : input_ids.shape[1] + 8])
    assert torch.equal(second, expected[:, : input_ids.shape[1] + 16])
    assert torch.equal(third, expected)


def test_crop_takes_transformers_sign_and_stays_within_the_session():
    session = InferenceSession(client=None, max_length=16, batch_size=1)  # never opened: crop is local
    session.position = 10
    cache = RemoteCache(session)
    cache.crop(0)
    cache.crop(-3)
    assert cache.get_seq_length() == 7 and cache.is_croppable
    with pytest.raises(InvalidRequest, match="cannot crop 8 tokens from a session holding 7"):
        cache.crop(-8)
    with pytest.raises(InvalidRequest, match="cannot crop"):
        cache.crop(2)  # transformers' old meaning (a final length) is refused, as DynamicCache refuses it
