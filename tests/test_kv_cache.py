"""The preallocated session cache and merged decode steps, on a span of a tiny model (no processes).

A session cache must give what transformers' DynamicCache gives (prefill, decode, rollback, beam
reorder, padding), and steps of several sessions merged into one forward must give each session
what it gets alone, whatever its length, position, batch and padding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from swarm.families import family_of
from swarm.server.inference_steps import InferenceStep, run_merged, run_steps
from swarm.server.kv_cache import SessionCache
from swarm.server.span_runner import SpanRunner
from swarm.wire.codecs import extend_padding_mask
from tests.conftest import TINY_CONFIGS

START, END = 2, 5  # a span that starts past block 0, as a second server's does
MAX_LENGTH = 32


def make_runner(family: str) -> SpanRunner:
    torch.manual_seed(0)
    config = TINY_CONFIGS[family]()
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    return SpanRunner(config, family_of(config), START, nn.ModuleList(model.model.layers[START:END]))


def hidden(batch: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, tokens, 64, generator=torch.Generator().manual_seed(seed))


class Session:
    """What a server's session loop keeps: a cache, a position and a padding mask; steps as the handler makes them."""

    def __init__(self, runner: SpanRunner, batch: int, cache: object = None):
        self.runner, self.batch = runner, batch
        self.cache = cache if cache is not None else SessionCache(runner.config, START, END, batch, MAX_LENGTH, torch.float32)
        self.position = 0
        self.mask: torch.Tensor | None = None

    def step(self, states: torch.Tensor, position: int | None = None, new_mask: torch.Tensor | None = None,
             reorder: list[int] | None = None) -> InferenceStep:
        position = self.position if position is None else position
        if reorder is not None:
            self.cache.reorder_cache(torch.tensor(reorder))
            self.mask = self.mask[reorder] if self.mask is not None else None
        if position < self.position:
            self.cache.crop(position - self.position)
        self.mask = extend_padding_mask(self.mask, position, new_mask, self.batch, states.shape[1])
        self.position = position + states.shape[1]
        return InferenceStep(self.runner, START, END, states, position, self.cache, self.mask, None)

    def run(self, *args: object, **kwargs: object) -> torch.Tensor:
        step = self.step(*args, **kwargs)
        with torch.inference_mode():
            return self.runner(step.hidden, START, END, position=step.position, cache=step.cache, padding_mask=step.padding_mask)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text"])
def test_session_cache_gives_what_dynamic_cache_gives(family):
    """Prefill, decode past the sliding window, rollback, a chunk, beam reorder and left padding."""
    runner = make_runner(family)
    ours, theirs = Session(runner, 2), Session(runner, 2, DynamicCache())
    padding = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    script = [
        dict(states=hidden(2, 7, 1), new_mask=padding),
        dict(states=hidden(2, 1, 2)),
        dict(states=hidden(2, 1, 3), reorder=[1, 1]),
        dict(states=hidden(2, 1, 4)),
        dict(states=hidden(2, 3, 5), position=8),  # rolls back one token, then a chunk
        dict(states=hidden(2, 1, 6), reorder=[1, 0]),
        dict(states=hidden(2, 1, 7), position=4),  # rolls back into the prompt
    ]
    for kwargs in script:
        torch.testing.assert_close(ours.run(**kwargs), theirs.run(**kwargs), atol=1e-5, rtol=0)
    assert ours.cache.length == ours.position == 5


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text"])
def test_merged_steps_give_each_session_what_it_gets_alone(family):
    """Sessions of different lengths, batches and padding, one rolled back: one forward per step."""
    runner = make_runner(family)
    shapes = [(1, 5, None), (2, 9, torch.tensor([[False] * 3 + [True] * 6, [True] * 9])), (1, 3, None)]
    merged = [Session(runner, batch) for batch, _, _ in shapes]
    alone = [Session(runner, batch) for batch, _, _ in shapes]
    for index, (batch, length, mask) in enumerate(shapes):
        prompt = hidden(batch, length, 10 + index)
        torch.testing.assert_close(merged[index].run(prompt, new_mask=mask), alone[index].run(prompt, new_mask=mask), atol=0, rtol=0)
    for token in range(6):
        kwargs = [dict(states=hidden(s.batch, 1, 100 * token + i)) for i, s in enumerate(merged)]
        if token == 3:
            kwargs[1]["position"] = 7  # a rollback inside a merged step
        outputs = run_merged([session.step(**kw) for session, kw in zip(merged, kwargs)])
        for session, kw, output in zip(alone, kwargs, outputs):
            torch.testing.assert_close(output, session.run(**kw), atol=1e-5, rtol=0)
    for ours, reference in zip(merged, alone):
        filled = slice(0, reference.position)
        for layer_ours, layer_ref in zip(ours.cache.span_layers(), reference.cache.span_layers()):
            assert layer_ours.length == layer_ref.length == reference.position
            torch.testing.assert_close(layer_ours.keys[:, :, filled], layer_ref.keys[:, :, filled], atol=1e-5, rtol=0)


def test_a_failed_merged_forward_is_retried_alone_for_each_session():
    """A step whose cache cannot take it fails alone; the step merged with it still gets its exact output."""
    runner = make_runner("llama")
    good, bad, reference = Session(runner, 1), Session(runner, 1), Session(runner, 1)
    torch.testing.assert_close(good.run(hidden(1, 4, 1)), reference.run(hidden(1, 4, 1)), atol=0, rtol=0)
    bad.run(hidden(1, MAX_LENGTH - 1, 2))
    steps = [good.step(hidden(1, 1, 3)), bad.step(hidden(1, 1, 4))]
    steps[1].position = MAX_LENGTH  # a gap after what its cache holds: this forward must fail
    (output, error), merged = run_steps(steps)
    assert not merged
    assert isinstance(error, ValueError) and "would leave a gap" in str(error)
    torch.testing.assert_close(output, reference.run(hidden(1, 1, 3)), atol=1e-6, rtol=0)
    full = Session(runner, 1)
    full.run(hidden(1, MAX_LENGTH, 5))
    with pytest.raises(ValueError, match="do not fit a cache"):
        full.step(hidden(1, 1, 6)).run_alone()  # one past the preallocated length


def test_session_cache_holds_exactly_the_bytes_its_session_reserves():
    """The budget reserves batch x max_length x kv_bytes_per_token; the cache allocates that, once."""
    runner = make_runner("llama")
    cache = SessionCache(runner.config, START, END, 3, MAX_LENGTH, torch.float32)
    assert cache.nbytes() == 3 * MAX_LENGTH * runner.kv_bytes_per_token(START, END)
    buffers = [layer.keys.data_ptr() for layer in cache.span_layers()]
    session = Session(runner, 3, cache)
    for token in range(5):
        session.run(hidden(3, 1, token))
    assert [layer.keys.data_ptr() for layer in cache.span_layers()] == buffers  # written in place, never regrown
    assert cache.nbytes() == 3 * MAX_LENGTH * runner.kv_bytes_per_token(START, END)
