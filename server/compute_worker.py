"""One compute thread that runs typed tasks in the order the fair scheduler chooses.

torch releases the GIL inside its kernels, so the server's event loop keeps answering while the
thread computes; one thread (not a pool) keeps torch's intra-op threads from competing. Which task
runs next (fair between peers, and between inference and training) is server/scheduler.py's call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from swarm.server.scheduler import FairScheduler, Task, TaskKind

T = TypeVar("T")

MAX_QUEUED_TASKS = 1024  # tasks waiting over all peers; beyond it requests are refused at once


class ComputeWorker:
    def __init__(self, name: str = "swarm-compute", max_queued: int = MAX_QUEUED_TASKS):
        self._scheduler = FairScheduler(max_queued)
        self._ready = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

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

    def _next(self) -> Task | None:
        with self._ready:
            while not self._stopping and not len(self._scheduler):
                self._ready.wait()
            return None if self._stopping else self._scheduler.pop()

    def _run(self) -> None:
        while (task := self._next()) is not None:
            loop, future, fn = task.payload
            if future.cancelled():
                continue
            try:
                result = fn()
            except BaseException as e:  # delivered to the awaiting handler, which reports it
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
