"""One compute thread with a priority queue: inference steps run before forward batches.

torch releases the GIL inside its kernels, so the server's event loop keeps answering while the
thread computes; one thread (not a pool) keeps torch's intra-op threads from competing.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

PRIORITY_INFERENCE = 0
PRIORITY_FORWARD = 1


class ComputeWorker:
    def __init__(self, name: str = "swarm-compute"):
        self._tasks: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()  # FIFO among tasks of equal priority
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._tasks.put((-1, next(self._order), None))
        self._thread.join(timeout=10)

    async def submit(self, priority: int, fn: Callable[[], T]) -> T:
        """Run `fn` on the compute thread and await its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._tasks.put((priority, next(self._order), (loop, future, fn)))
        return await future

    def _run(self) -> None:
        while True:
            _, _, task = self._tasks.get()
            if task is None:
                return
            loop, future, fn = task
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
