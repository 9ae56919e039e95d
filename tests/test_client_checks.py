"""The client honours servers' limits and checks their answers; bans decay and never strand blocks.

Pure pieces (reply checks, the ban list) as plain data; the per-step token limit against real
server processes that announce a small one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from peft import LoraConfig
from swarm.client.reply_checks import decode_named_replies, decode_reply
from swarm.client.retry import BanList, RetryPolicy
from swarm.errors import InvalidRequest, RemoteError
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import encode
from tests.conftest import local_and_remote, served_counts

PEER = "12D3KooWLfeu2jMWADXprq3c7D7HeKPYd6WENS2zbDUJqS5NNZkb"


# ---- reply checks --------------------------------------------------------------------------------


def test_a_reply_of_the_asked_shape_decodes():
    tensor = torch.randn(2, 3, 8)
    torch.testing.assert_close(decode_reply(PEER, encode(tensor), (2, 3, 8), "hidden states"), tensor)


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        (encode(torch.randn(2, 4, 8)), "sent hidden states of shape (2, 4, 8), expected (2, 3, 8)"),
        (encode(torch.full((2, 3, 8), float("nan"))), "sent hidden states with NaN or Inf values"),
        (pb.Tensor(shape=[2, 3, 8], dtype="float32", codec="none", data=b"\x00" * 10), "that cannot be decoded"),
        (pb.Tensor(shape=[2, 3, 8], dtype="float64", codec="none"), "that cannot be decoded"),
    ],
    ids=["wrong-shape", "nan", "short-payload", "bad-dtype"],
)
def test_a_bad_reply_is_the_servers_fault(message, needle):
    with pytest.raises(RemoteError, match="server .*" + needle.replace("(", r"\(").replace(")", r"\)")) as caught:
        decode_reply(PEER, message, (2, 3, 8), "hidden states")
    assert caught.value.peer == PEER


def test_named_gradients_must_match_what_was_sent():
    sent = [pb.NamedTensor(name="0.q.lora_A", tensor=encode(torch.zeros(4, 8)))]
    good = [pb.NamedTensor(name="0.q.lora_A", tensor=encode(torch.ones(4, 8)))]
    assert decode_named_replies(PEER, good, sent, "LoRA gradients")["0.q.lora_A"].shape == (4, 8)
    for replies, needle in (
        ([], "sent no LoRA gradients for 0.q.lora_A"),
        ([pb.NamedTensor(name="9.x", tensor=encode(torch.ones(4, 8)))], "'9.x', which was not asked for"),
        (good + good, "which was not asked for"),
        ([pb.NamedTensor(name="0.q.lora_A", tensor=encode(torch.ones(8, 4)))], "of shape (8, 4), expected (4, 8)"),
    ):
        with pytest.raises(RemoteError) as caught:
            decode_named_replies(PEER, replies, sent, "LoRA gradients")
        assert needle in str(caught.value)


# ---- bans ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("swarm.client.retry.time.monotonic", clock)
    return clock


def test_bans_double_then_reset_on_success(clock):
    bans = BanList(RetryPolicy(ban_time=10, max_ban_time=100))
    bans.ban("a")
    clock.now += 9
    assert bans.banned() == {"a"}
    clock.now += 2
    assert bans.banned() == set()
    bans.ban("a")  # second failure soon after: 20 s
    clock.now += 19
    assert bans.banned() == {"a"}
    clock.now += 2
    bans.succeeded("a")
    bans.ban("a")  # the success wiped the history: 10 s again
    clock.now += 11
    assert bans.banned() == set()


def test_bans_decay_after_a_quiet_period(clock):
    bans = BanList(RetryPolicy(ban_time=10, max_ban_time=100))
    for _ in range(5):
        bans.ban("a")
    clock.now += 1000  # long after the last failure
    bans.ban("a")
    clock.now += 11
    assert bans.banned() == set()


def test_when_every_holder_is_banned_the_oldest_failure_is_tried_again(clock):
    bans = BanList(RetryPolicy(ban_time=10, max_ban_time=1000))
    for _ in range(4):
        bans.ban("old")  # banned for 80 s
    clock.now += 5
    assert bans.release_oldest({"old"}) is None  # a fresh failure: no second chance yet (a dead server)
    clock.now += 20
    bans.ban("new")
    bans.ban("elsewhere")
    clock.now += 8
    assert bans.release_oldest({"new", "old"}) == "old"
    assert bans.banned() == {"new", "elsewhere"}
    assert bans.release_oldest({"new", "unknown"}) is None


# ---- the server's per-step token limit -----------------------------------------------------------

TOKEN_LIMIT = 16  # batch x new tokens per step, announced by the servers at session open


@pytest.fixture(scope="module")
def limited_swarm(tiny_models) -> Iterator[tuple[torch.nn.Module, torch.nn.Module]]:
    with local_and_remote(tiny_models["llama"], "--max-tokens-per-request", str(TOKEN_LIMIT)) as models:
        yield models


@pytest.mark.timeout(240)
def test_a_prompt_longer_than_the_servers_limit_is_sent_in_steps(limited_swarm):
    local, remote = limited_swarm
    input_ids = torch.randint(3, 211, (2, 21), generator=torch.Generator().manual_seed(4))  # 42 tokens > 16
    before = served_counts(remote)
    produced = remote.generate(input_ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    after = served_counts(remote)
    assert torch.equal(produced, local.generate(input_ids, max_new_tokens=5, do_sample=False, eos_token_id=None))
    # 21 tokens per sequence at 8 per step (16 // batch 2) is 3 steps, then 4 decode steps.
    assert len(after) == 2
    assert all(after[peer].inference_steps - before[peer].inference_steps == 3 + 4 for peer in after), (before, after)


def test_a_liar_stays_banned_whatever_happens(clock):
    bans = BanList(RetryPolicy(ban_time=10, max_ban_time=100))
    bans.ban_forever("liar")
    bans.succeeded("liar")
    bans.ban("liar")  # an ordinary failure never shortens it
    clock.now += 10_000
    assert bans.banned() == {"liar"}
    assert bans.release_oldest({"liar"}) is None


@pytest.mark.timeout(240)
def test_a_batch_over_the_servers_limit_is_sent_in_parts(limited_swarm):
    local, remote = limited_swarm
    ids = torch.randint(3, 211, (5, 7), generator=torch.Generator().manual_seed(5))  # 35 tokens > 16: parts of 2 rows
    before = served_counts(remote)
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, local(ids).logits, atol=1e-4, rtol=0)
    after = served_counts(remote)
    assert all(after[peer].forwards - before[peer].forwards == 3 for peer in after), (before, after)

    remote.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), adapter_name="parts")
    try:
        remote(ids, labels=ids).loss.backward()  # training splits the same way (forward and backward)
        grads = [p.grad for p in remote.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    finally:
        remote.disable_adapters()

    with pytest.raises(InvalidRequest, match="a sequence of 20 tokens exceeds the servers' per-request limit of 16 tokens"):
        remote(torch.randint(3, 211, (1, 20)))
