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
