"""Which compute task runs next: fair between peers, and between inference and training.

Tasks are typed (inference step, forward, backward) and carry their peer and cost (tokens x
blocks, backward counted twice). Two classes share the compute thread by weighted fair queueing:
each class's virtual time grows by cost / weight as its tasks run, and the class that is behind
runs next, so under load inference gets INFERENCE_WEIGHT / (INFERENCE_WEIGHT + TRAINING_WEIGHT) of
the compute and training the rest: decode steps stay fast, and training is never starved (as it
was under a strict priority). Within a class, peers take turns the same way, so one peer with
many requests gets no more than any other peer with work waiting. A class or peer that was idle
resumes at the current virtual time, never with credit saved up while idle.

Inference steps of different sessions that can share one forward (equal `merge_key`: same span,
same number of new tokens, no adapter or a held one) are merged when the next task is such a step: `pop_batch`
takes the other queued steps with its key, at most one per session and in each peer's order,
up to a number of steps and of tokens, and charges each to its own peer and the batch to the
inference class, exactly as if they had run one after another. Nothing waits for a batch to fill:
what is queued when the worker picks a step rides along, so an idle server answers at once and a
busy one merges the steps that piled up while it computed.

This module is pure (no threads, no torch): the compute worker drives it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Hashable
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
    merge_key: Hashable | None = None  # inference steps with equal keys may run as one forward; None: never merged
    session: Hashable | None = None  # steps of one session never share a forward and keep their order
    tokens: int = 0  # batch x new tokens, bounded over a merged forward


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

    def take_mergeable(self, first: Task, max_tasks: int, max_tokens: int) -> list[Task]:
        """Queued tasks that can share `first`'s forward, most-behind peers first, each charged to its peer."""
        taken: list[Task] = []
        sessions = {first.session}
        tokens = first.tokens
        for key in sorted(self.queues, key=lambda k: self.virtual[k]):
            queue = self.queues[key]
            for task in list(queue):
                if len(taken) + 1 >= max_tasks:
                    return taken
                if task.session in sessions:
                    continue  # a session's later step waits for its earlier one
                sessions.add(task.session)
                if task.merge_key != first.merge_key or tokens + task.tokens > max_tokens:
                    continue
                queue.remove(task)
                self.virtual[key] += task.cost
                tokens += task.tokens
                taken.append(task)
            if not queue:
                del self.queues[key]
        return taken

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
        batch = self.pop_batch(max_tasks=1, max_tokens=0)
        return batch[0] if batch else None

    def pop_batch(self, max_tasks: int, max_tokens: int) -> list[Task]:
        """The next task to run and the queued steps that can run in the same forward with it (see the
        module docstring): at most `max_tasks` tasks and `max_tokens` tokens in all. Empty if nothing waits."""
        waiting = [name for name, queues in self._classes.items() if queues]
        if not waiting:
            return []
        name = min(waiting, key=lambda n: self._virtual[n])
        queues = self._classes[name]
        batch = [queues.pop()]
        if batch[0].merge_key is not None and max_tasks > 1:
            batch += queues.take_mergeable(batch[0], max_tasks, max_tokens)
        self._now = self._virtual[name]
        self._virtual[name] += sum(task.cost for task in batch) / self._weights[name]
        return batch

    def queued_sessions(self) -> dict[Hashable, set[Hashable]]:
        """The sessions with a mergeable inference step queued, by merge key (for server/step_gathering.py)."""
        queued: dict[Hashable, set[Hashable]] = {}
        for queue in self._classes["inference"].queues.values():
            for task in queue:
                if task.merge_key is not None:
                    queued.setdefault(task.merge_key, set()).add(task.session)
        return queued

    def __len__(self) -> int:
        return sum(len(queues) for queues in self._classes.values())
