"""One compute thread that runs typed tasks in the order the fair scheduler chooses.

torch releases the GIL inside its kernels, so the server's event loop keeps answering while the
thread computes; one thread (not a pool) keeps torch's intra-op threads from competing. Which task
runs next (fair between peers, and between inference and training) and which inference steps of
other sessions ride along in the same forward is server/scheduler.py's call; how merged steps
run is server/inference_steps.py's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from swarm.server.inference_steps import InferenceStep, run_steps
from swarm.server.scheduler import FairScheduler, Task, TaskKind
from swarm.server.step_gathering import StepGathering

T = TypeVar("T")

MAX_QUEUED_TASKS = 1024  # tasks waiting over all peers; beyond it requests are refused at once
DEFAULT_MAX_MERGED_STEPS = 32  # inference steps of different sessions in one forward


class ComputeWorker:
    def __init__(
        self,
        name: str = "swarm-compute",
        max_queued: int = MAX_QUEUED_TASKS,
        max_merged_steps: int = DEFAULT_MAX_MERGED_STEPS,
        max_merged_tokens: int = 1 << 30,
    ):
        """`max_merged_steps`: most inference steps of different sessions in one forward (1: never merge);
        `max_merged_tokens`: most tokens (batch x new tokens) over a merged forward."""
        self._scheduler = FairScheduler(max_queued)
        self._ready = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.max_merged_steps = max_merged_steps
        self.max_merged_tokens = max_merged_tokens
        self.merged_forwards = 0  # forwards that ran the steps of several sessions (reported by `info`)
        self.merged_steps = 0  # inference steps that ran in them
        self._gathering = StepGathering()  # whose steps to wait for before a merged forward (step_gathering.py)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join(timeout=10)

    async def submit(self, kind: TaskKind, peer: str, cost: float, fn: Callable[[], T]) -> T:
        """Run `fn` on the compute thread when its turn comes and await its result.

        `cost`: tokens x blocks it processes (backward: twice). Raises LimitExceeded if the queue is full.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._ready:
            self._scheduler.push(Task(kind, peer, cost, (loop, future, fn)))
            self._ready.notify()
        return await future

    async def submit_step(self, peer: str, cost: float, step: InferenceStep) -> torch.Tensor:
        """Run an inference step when its turn comes, possibly in one forward with other sessions' steps
        (scheduler.py decides which); its output (batch, new_tokens, hidden). Raises LimitExceeded if the queue is full."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        task = Task(TaskKind.INFERENCE, peer, cost, (loop, future, step), merge_key=step.merge_key, session=step.cache,
                    tokens=step.tokens)
        with self._ready:
            self._scheduler.push(task)
            self._ready.notify()
        return await future

    def _next(self) -> list[Task]:
        with self._ready:
            while not self._stopping and not len(self._scheduler):
                self._ready.wait()
            if self.max_merged_steps > 1:
                self._gather()
            return [] if self._stopping else self._scheduler.pop_batch(self.max_merged_steps, self.max_merged_tokens)

    def _gather(self) -> None:
        """Wait on `_ready` (its lock released meanwhile) while sessions that recently shared a forward are
        still missing from the queue, within the time step_gathering.py allows; every queued step wakes it."""
        wait = self._gathering.wait_for(self._scheduler.queued_sessions(), time.monotonic())
        deadline = time.monotonic() + wait
        while wait > 0 and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._ready.wait(remaining)
            wait = self._gathering.wait_for(self._scheduler.queued_sessions(), time.monotonic())

    def _run(self) -> None:
        while batch := self._next():
            batch = [task for task in batch if not task.payload[1].cancelled()]
            if not batch:
                continue
            if isinstance(batch[0].payload[2], InferenceStep):
                self._run_steps(batch)
                continue
            (task,) = batch
            loop, future, fn = task.payload
            try:
                result = fn()
            except BaseException as e:  # delivered to the awaiting handler, which reports it
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

    def _run_steps(self, batch: list[Task]) -> None:
        began = time.monotonic()
        results, merged = run_steps([task.payload[2] for task in batch])
        if batch[0].merge_key is not None:
            ended = time.monotonic()
            self._gathering.ran(batch[0].merge_key, [task.session for task in batch], ended - began, ended)
        if merged:
            self.merged_forwards += 1
            self.merged_steps += len(batch)
        for task, result in zip(batch, results):
            loop, future, _ = task.payload
            if isinstance(result, Exception):
                loop.call_soon_threadsafe(_set_exception, future, result)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
