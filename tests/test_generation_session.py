"""generate() runs as one inference session of steps on the servers, whatever transformers calls
its cache argument, and fails loudly instead of falling back to context-free forwards.

transformers 5.24 renamed generate's cache argument from `past_key_values` to `cache`; a client that
looked for the old name sent every new token as a stateless forward and printed garbage, with exit
code 0. The servers' own request counts (`info.served`) show what really reached them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from transformers import Cache, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from swarm.cache_argument import KNOWN_NAMES, cache_argument
from swarm.errors import CacheNotPassed, ConfigError
from swarm.wire import swarm_rpc_pb2 as pb
from tests.conftest import local_and_remote, served_counts

pytestmark = pytest.mark.timeout(240)

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def llama_swarm(tiny_models) -> Iterator[tuple[torch.nn.Module, torch.nn.Module]]:
    with local_and_remote(tiny_models["llama"]) as models:
        yield models


def requests_between(before: dict[str, pb.RequestCounts], after: dict[str, pb.RequestCounts]) -> dict[str, dict[str, int]]:
    fields = ("sessions_opened", "inference_steps", "forwards", "backwards")
    return {peer: {f: getattr(after[peer], f) - getattr(before[peer], f) for f in fields} for peer in before}


def test_generate_is_one_session_of_steps(llama_swarm):
    local, remote = llama_swarm
    input_ids = torch.randint(3, 211, (1, 7), generator=torch.Generator().manual_seed(5))
    expected = local.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    before = served_counts(remote)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the cache goes in under the name this release expects
        produced = remote.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    served = requests_between(before, served_counts(remote))
    assert torch.equal(produced, expected)
    assert len(served) == 2, served
    # The prompt in one step, then one step per new token but the last (it is never fed back).
    for peer, counts in served.items():
        assert counts == {"sessions_opened": 1, "inference_steps": NEW_TOKENS, "forwards": 0, "backwards": 0}, (peer, counts)


def test_generate_refuses_to_run_without_its_session_cache(llama_swarm, monkeypatch):
    """A transformers release that stops handing the cache to the layers fails at the first step."""
    _, remote = llama_swarm
    inner_forward = remote.model.forward

    def forward_that_drops_the_cache(*args, **kwargs):
        return inner_forward(*args, **{name: value for name, value in kwargs.items() if not isinstance(value, Cache)})

    monkeypatch.setattr(remote.model, "forward", forward_that_drops_the_cache)
    before = served_counts(remote)
    with pytest.raises(CacheNotPassed, match="without the inference session's cache"):
        remote.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    served = requests_between(before, served_counts(remote))
    assert all(counts["forwards"] == 0 and counts["inference_steps"] == 0 for counts in served.values()), served


def test_plain_forward_outside_generate_still_works(llama_swarm):
    local, remote = llama_swarm
    input_ids = torch.randint(3, 211, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(remote(input_ids).logits, local(input_ids).logits, atol=1e-4, rtol=0)


# ---- finding the cache argument by its annotation (no processes) ---------------------------------


def new_style(hidden, cache: Cache | None = None, use_cache: bool | None = None): ...
def old_style(hidden, past_key_values: Cache | None = None, use_cache: bool = False): ...
def postponed(hidden, kv: "Cache | None" = None): ...
def unannotated(hidden, past_key_values=None, use_cache=None): ...
def no_cache(hidden, mask: torch.Tensor | None = None): ...
def two_caches(hidden, cache: Cache | None = None, other: Cache | None = None): ...


@pytest.mark.parametrize(
    ("function", "name"),
    [(new_style, "cache"), (old_style, "past_key_values"), (postponed, "kv"), (unannotated, "past_key_values")],
)
def test_cache_argument_is_read_off_the_signature(function, name):
    assert cache_argument(function) == name


@pytest.mark.parametrize("function", [no_cache, two_caches])
def test_unknown_cache_argument_is_a_clear_error(function):
    with pytest.raises(ConfigError, match="cannot tell which argument of .* takes the KV cache"):
        cache_argument(function)


def test_installed_transformers_has_a_known_cache_argument():
    """What the client (model forward) and the server (layers, masks) call in the installed release."""
    for function in (LlamaForCausalLM.forward, LlamaDecoderLayer.forward, create_causal_mask):
        assert cache_argument(function) in KNOWN_NAMES
