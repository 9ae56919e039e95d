"""The compute scheduler as plain data: fair between peers, inference favoured but training never starved."""

from __future__ import annotations

from collections import Counter

import pytest

from swarm.errors import LimitExceeded
from swarm.server.scheduler import INFERENCE_WEIGHT, TRAINING_WEIGHT, FairScheduler, Task, TaskKind


def run(scheduler: FairScheduler, count: int) -> list[Task]:
    return [scheduler.pop() for _ in range(count)]


def test_one_busy_peer_does_not_crowd_out_another():
    scheduler = FairScheduler(max_queued=1000)
    for index in range(100):
        scheduler.push(Task(TaskKind.INFERENCE, "flood", 1.0, index))
    scheduler.push(Task(TaskKind.INFERENCE, "polite", 1.0, "mine"))
    first = run(scheduler, 2)
    assert "mine" in [task.payload for task in first]  # served within one turn, not after 100 others


def test_peers_share_by_cost_not_by_count():
    scheduler = FairScheduler(max_queued=1000)
    for _ in range(50):
        scheduler.push(Task(TaskKind.FORWARD, "big", 4.0, None))
        scheduler.push(Task(TaskKind.FORWARD, "small", 1.0, None))
    done = Counter(task.peer for task in run(scheduler, 40))
    assert done["small"] == pytest.approx(4 * done["big"], abs=4)


def test_training_gets_its_share_under_constant_inference():
    scheduler = FairScheduler(max_queued=10_000)
    for _ in range(1000):
        scheduler.push(Task(TaskKind.INFERENCE, "chat", 1.0, None))
        scheduler.push(Task(TaskKind.FORWARD, "trainer", 1.0, None))
    cost = Counter(task.kind for task in run(scheduler, 400))
    share = cost[TaskKind.FORWARD] / 400
    assert share == pytest.approx(TRAINING_WEIGHT / (INFERENCE_WEIGHT + TRAINING_WEIGHT), abs=0.02)


def test_an_idle_class_saves_no_credit():
    scheduler = FairScheduler(max_queued=10_000)
    for _ in range(200):
        scheduler.push(Task(TaskKind.INFERENCE, "chat", 1.0, None))
    run(scheduler, 200)  # only inference ran for a long time
    for _ in range(50):
        scheduler.push(Task(TaskKind.FORWARD, "trainer", 1.0, None))
        scheduler.push(Task(TaskKind.INFERENCE, "chat", 1.0, None))
    first = run(scheduler, 8)
    assert sum(task.kind is TaskKind.INFERENCE for task in first) >= 5  # not 8 training tasks in a row


def test_a_full_queue_refuses_with_its_limit():
    scheduler = FairScheduler(max_queued=2)
    scheduler.push(Task(TaskKind.INFERENCE, "a", 1.0, None))
    scheduler.push(Task(TaskKind.BACKWARD, "b", 1.0, None))
    with pytest.raises(LimitExceeded, match=r"compute queue is full \(2 tasks waiting\)"):
        scheduler.push(Task(TaskKind.INFERENCE, "c", 1.0, None))
    assert scheduler.pop() is not None and scheduler.pop() is not None and scheduler.pop() is None


# ---- merging inference steps of different sessions into one forward --------------------------------


def step(peer: str, session: str, key: object = "span 0:15, 1 token", tokens: int = 1, cost: float = 1.0) -> Task:
    return Task(TaskKind.INFERENCE, peer, cost, session, merge_key=key, session=session, tokens=tokens)


def test_queued_steps_with_the_same_key_run_in_one_batch():
    scheduler = FairScheduler(max_queued=100)
    for index in range(5):
        scheduler.push(step(f"peer{index}", f"s{index}"))
    scheduler.push(step("peer9", "other span", key="span 15:30, 1 token"))
    scheduler.push(Task(TaskKind.FORWARD, "trainer", 1.0, "training"))
    batch = scheduler.pop_batch(max_tasks=32, max_tokens=1000)
    assert [task.payload for task in batch] == ["s0", "s1", "s2", "s3", "s4"]
    rest = {task.payload for task in (scheduler.pop(), scheduler.pop())}
    assert rest == {"other span", "training"} and scheduler.pop() is None


def test_steps_that_must_run_alone_are_never_merged():
    scheduler = FairScheduler(max_queued=100)
    scheduler.push(step("a", "with adapter", key=None))
    scheduler.push(step("b", "plain"))
    scheduler.push(step("c", "plain too"))
    assert [task.payload for task in scheduler.pop_batch(32, 1000)] == ["with adapter"]
    assert [task.payload for task in scheduler.pop_batch(32, 1000)] == ["plain", "plain too"]
    scheduler.push(Task(TaskKind.FORWARD, "t", 1.0, "f1"))
    scheduler.push(Task(TaskKind.FORWARD, "t", 1.0, "f2"))
    assert len(scheduler.pop_batch(32, 1000)) == 1  # training tasks carry no merge key


def test_one_step_per_session_in_a_batch_and_in_order():
    scheduler = FairScheduler(max_queued=100)
    scheduler.push(Task(TaskKind.INFERENCE, "p", 1.0, "s1 first", merge_key="k", session="s1", tokens=1))
    scheduler.push(Task(TaskKind.INFERENCE, "p", 1.0, "s1 second", merge_key="k", session="s1", tokens=1))
    scheduler.push(Task(TaskKind.INFERENCE, "p", 1.0, "s2 long", merge_key="other", session="s2", tokens=1))
    scheduler.push(Task(TaskKind.INFERENCE, "p", 1.0, "s2 next", merge_key="k", session="s2", tokens=1))
    scheduler.push(Task(TaskKind.INFERENCE, "p", 1.0, "s3", merge_key="k", session="s3", tokens=1))
    # s2's mergeable step waits behind its own earlier step; s1's second behind its first
    assert [task.payload for task in scheduler.pop_batch(32, 1000)] == ["s1 first", "s3"]


def test_a_batch_stays_within_its_step_and_token_limits():
    scheduler = FairScheduler(max_queued=100)
    for index in range(10):
        scheduler.push(step("p", f"s{index}", tokens=4))
    assert len(scheduler.pop_batch(max_tasks=3, max_tokens=1000)) == 3
    assert len(scheduler.pop_batch(max_tasks=32, max_tokens=10)) == 2  # 4 + 4 tokens; a third would make 12
    assert len(scheduler.pop_batch(max_tasks=1, max_tokens=1000)) == 1  # max_tasks 1: merging off


def test_merged_steps_are_charged_to_their_peers_and_training_keeps_its_share():
    """Riding along in a batch costs a peer its turn, and inference batches cost the class what their steps cost."""
    scheduler = FairScheduler(max_queued=100_000)
    for round_ in range(500):
        for peer in ("a", "b", "c"):
            scheduler.push(step(peer, f"{peer}{round_}"))
        scheduler.push(Task(TaskKind.FORWARD, "trainer", 1.0, None))
    cost: Counter = Counter()
    for _ in range(400):
        for task in scheduler.pop_batch(max_tasks=32, max_tokens=1000):
            cost[task.kind] += task.cost
    share = cost[TaskKind.FORWARD] / sum(cost.values())
    assert share == pytest.approx(TRAINING_WEIGHT / (INFERENCE_WEIGHT + TRAINING_WEIGHT), abs=0.03)
    scheduler = FairScheduler(max_queued=100)
    scheduler.push(step("a", "a1"))
    scheduler.push(step("b", "b1"))
    scheduler.pop_batch(32, 1000)  # b's step rode along with a's
    scheduler.push(step("a", "a2", key="other"))
    scheduler.push(step("b", "b2", key="another"))
    scheduler.push(step("c", "c1", key="a third"))
    assert scheduler.pop_batch(32, 1000)[0].payload == "c1"  # a and b have both had a turn
