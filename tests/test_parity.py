"""Parity: a model split over real server processes equals local transformers, for each family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.errors import InvalidRequest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def family_swarm(three_servers):
    """(local model, distributed model) of one family, the latter over three servers."""
    path, swarm = three_servers
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, wire_codec="none")
    yield local, remote
    remote.swarm_client.shutdown()


def test_logits_and_generation_match_local(family_swarm):
    local, remote = family_swarm
    torch.manual_seed(1)
    input_ids = torch.randint(3, 211, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(remote(input_ids).logits, local(input_ids).logits, atol=1e-4, rtol=0)

    expected = local.generate(input_ids, max_new_tokens=32, do_sample=False, eos_token_id=None)
    produced = remote.generate(input_ids, max_new_tokens=32, do_sample=False, eos_token_id=None)
    assert torch.equal(produced, expected)

    torch.manual_seed(7)
    expected = local.generate(input_ids, max_new_tokens=16, do_sample=True, top_k=20, eos_token_id=None)
    torch.manual_seed(7)
    produced = remote.generate(input_ids, max_new_tokens=16, do_sample=True, top_k=20, eos_token_id=None)
    assert torch.equal(produced, expected)


def test_rollback_to_a_diverging_prefix_matches_local(family_swarm):
    """A second prompt that shares only 3 tokens with the first rolls the servers' caches back (past
    Mistral's 4-token sliding window too): the tokens equal a fresh local generation, no server is banned."""
    local, remote = family_swarm
    first = torch.randint(3, 211, (1, 10), generator=torch.Generator().manual_seed(8))
    second = torch.cat([first[:, :3], torch.randint(3, 211, (1, 4), generator=torch.Generator().manual_seed(9))], dim=1)
    with remote.inference_session(max_length=64) as session:
        remote.generate(first, max_new_tokens=6, do_sample=False, eos_token_id=None)
        produced = remote.generate(second, max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert session.position == second.shape[1] + 6 - 1
    assert torch.equal(produced, local.generate(second, max_new_tokens=6, do_sample=False, eos_token_id=None))
    assert not remote.swarm_client.bans.banned()


def test_session_reused_across_generate_calls(family_swarm):
    local, remote = family_swarm
    input_ids = torch.randint(3, 211, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = local.generate(input_ids, max_new_tokens=20, do_sample=False, eos_token_id=None)
    with remote.inference_session(max_length=64) as session:
        first = remote.generate(input_ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
        second = remote.generate(None, max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert session.position == expected.shape[1] - 1
        assert len(remote.route) == 3
    assert torch.equal(first, expected[:, : first.shape[1]])
    assert torch.equal(second, expected)


def padded_batch(lengths: tuple[int, ...], side: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths padded (pad id 0) on `side`, as tokenizer(..., padding=True) makes them: (ids, mask)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        where = slice(width - length, width) if side == "left" else slice(0, length)
        ids[row, where] = torch.randint(3, 211, (length,), generator=generator)
        mask[row, where] = 1
    return ids, mask


def test_left_padded_batch_generates_like_local(family_swarm):
    local, remote = family_swarm
    ids, mask = padded_batch((3, 7, 5), "left", seed=21)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(remote.generate(ids, **kwargs), local.generate(ids, **kwargs))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_forward_matches_local_on_real_tokens(family_swarm, side):
    local, remote = family_swarm
    ids, mask = padded_batch((4, 9, 6), side, seed=22)
    with torch.no_grad():
        expected, produced = local(ids, attention_mask=mask).logits, remote(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(produced[real], expected[real], atol=1e-4, rtol=0)


def test_beam_search_and_generate_outputs_match_local(family_swarm):
    """Beam search reorders the servers' caches (with the next step, no extra round trip); dict outputs,
    scores and several returned sequences come out as from local transformers."""
    local, remote = family_swarm
    ids = torch.randint(3, 211, (2, 5), generator=torch.Generator().manual_seed(23))
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=7, do_sample=False, eos_token_id=None,
                  return_dict_in_generate=True, output_scores=True)
    expected, produced = local.generate(ids, **kwargs), remote.generate(ids, **kwargs)
    assert torch.equal(produced.sequences, expected.sequences)
    torch.testing.assert_close(produced.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=0)

    sample = dict(do_sample=True, num_return_sequences=3, max_new_tokens=6, top_k=10, eos_token_id=None)
    torch.manual_seed(4)
    expected = local.generate(ids, **sample)
    torch.manual_seed(4)
    assert torch.equal(remote.generate(ids, **sample), expected)


def test_router_logits_are_refused_not_left_empty(family_swarm):
    """A mixture of experts routes on the servers, which return hidden states only: asking for the
    router logits (for the load-balancing loss) is an error, never a loss computed without them."""
    local, remote = family_swarm
    if "output_router_logits" not in local.config:
        pytest.skip("not a mixture of experts")
    with pytest.raises(InvalidRequest, match="output_router_logits is not supported"):
        remote(torch.tensor([[5, 6, 7]]), output_router_logits=True)
