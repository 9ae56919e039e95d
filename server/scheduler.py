"""Which compute task runs next: fair between peers, and between inference and training.

Tasks are typed (inference step, forward, backward) and carry their peer and cost (tokens x
blocks, backward counted twice). Two classes share the compute thread by weighted fair queueing:
each class's virtual time grows by cost / weight as its tasks run, and the class that is behind
runs next, so under load inference gets INFERENCE_WEIGHT / (INFERENCE_WEIGHT + TRAINING_WEIGHT) of
the compute and training the rest: decode steps stay fast, and training is never starved (as it
was under a strict priority). Within a class, peers take turns the same way, so one peer with
many requests gets no more than any other peer with work waiting. A class or peer that was idle
resumes at the current virtual time, never with credit saved up while idle.

This module is pure (no threads, no torch): the compute worker drives it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from typing import Any

from swarm.errors import LimitExceeded


class TaskKind(enum.Enum):
    INFERENCE = "inference step"
    FORWARD = "forward"
    BACKWARD = "backward"


INFERENCE_WEIGHT = 3.0  # shares of the compute when both classes have work: inference 3/4,
TRAINING_WEIGHT = 1.0  # training 1/4 (decode steps are small and latency-bound; training is bulk)


@dataclasses.dataclass
class Task:
    kind: TaskKind
    peer: str
    cost: float  # tokens x blocks (backward: twice a forward's)
    payload: Any  # what the worker runs; opaque here


class _FairQueues:
    """Per-key FIFOs served by least virtual time (start-time fair queueing with equal weights)."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[Task]] = {}
        self.virtual: dict[str, float] = {}
        self.now = 0.0  # virtual time of the last task started

    def push(self, key: str, task: Task) -> None:
        if key not in self.queues:
            self.queues[key] = deque()
            self.virtual[key] = max(self.virtual.get(key, 0.0), self.now)  # no credit for idle time
        self.queues[key].append(task)

    def pop(self) -> Task:
        key = min(self.queues, key=lambda k: self.virtual[k])
        task = self.queues[key].popleft()
        self.now = self.virtual[key]
        self.virtual[key] += task.cost
        if not self.queues[key]:
            del self.queues[key]
        return task

    def __len__(self) -> int:
        return sum(len(queue) for queue in self.queues.values())


class FairScheduler:
    def __init__(self, max_queued: int):
        self.max_queued = max_queued
        self._classes = {"inference": _FairQueues(), "training": _FairQueues()}
        self._weights = {"inference": INFERENCE_WEIGHT, "training": TRAINING_WEIGHT}
        self._virtual = {"inference": 0.0, "training": 0.0}
        self._now = 0.0

    def push(self, task: Task) -> None:
        """Queue a task; LimitExceeded if the queue is full (the caller's request is refused at once)."""
        if len(self) >= self.max_queued:
            raise LimitExceeded(f"this server's compute queue is full ({self.max_queued} tasks waiting); try another server")
        name = "inference" if task.kind is TaskKind.INFERENCE else "training"
        if not self._classes[name]:
            self._virtual[name] = max(self._virtual[name], self._now)
        self._classes[name].push(task.peer, task)

    def pop(self) -> Task | None:
        """The next task to run, or None if nothing waits."""
        waiting = [name for name, queues in self._classes.items() if queues]
        if not waiting:
            return None
        name = min(waiting, key=lambda n: self._virtual[n])
        task = self._classes[name].pop()
        self._now = self._virtual[name]
        self._virtual[name] += task.cost / self._weights[name]
        return task

    def __len__(self) -> int:
        return sum(len(queues) for queues in self._classes.values())
