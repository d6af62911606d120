"""Dynamic batching behind a bounded queue.

Requests wait in an ``asyncio.Queue`` of at most ``max_queue`` items; a full queue refuses the
next one at once (:class:`Overloaded`, answered 503 with ``Retry-After``) instead of growing a
backlog. Each worker takes the oldest request and the others already waiting, up to
``max_batch``. While another batch is running it waits up to ``max_wait_s`` for the batch to fill;
an idle server starts at once, so a lone request pays no batching delay (under load, requests
gather in the queue while the previous batch runs). The batch function runs in its own thread,
so the event loop keeps answering health checks while a batch runs. A request whose deadline
passes while it waits is dropped before it costs any work; one whose batch item failed gets its
own exception, the others their results.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")


class Overloaded(Exception):
    """The queue is full; ``retry_after`` is the seconds after which a retry has a fair chance."""

    def __init__(self, depth: int | None, retry_after: int) -> None:
        waiting = f" ({depth} requests waiting)" if depth is not None else ""
        super().__init__(f"the server is busy{waiting}; retry after {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """A request was not answered within its deadline."""


class ShuttingDown(Exception):
    """The server is draining; new requests are refused."""


@dataclass
class _Pending(Generic[Item]):
    item: Item
    future: asyncio.Future[Any]
    deadline: float  # time.monotonic()


class Batcher(Generic[Item]):
    """Gathers :meth:`submit` calls into ``run_batch(items) -> results`` calls.

        ``run_batch`` returns one entry per item: its result, or an exception instance to raise
        in that item's caller. ``on_batch(size, seconds)`` and ``on_reject()`` (attributes, settable
    later) feed metrics.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Any]],
        *,
        max_batch: int = 4,
        max_wait_s: float = 0.01,
        max_queue: int = 32,
        workers: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or workers < 1 or max_wait_s < 0:
            raise ValueError("max_batch, max_queue and workers must be >= 1 and max_wait_s >= 0")
        self._run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue, self.workers = max_batch, max_wait_s, max_queue, workers
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.on_reject = on_reject or (lambda: None)
        self._queue: asyncio.Queue[_Pending[Item]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._batch_seconds = 0.1  # a running mean, for Retry-After
        self.in_flight = 0

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a batch)."""
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Start the workers on the running event loop."""
        self._queue = asyncio.Queue(self.max_queue)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="knnclip-batch")
        self._tasks = [asyncio.create_task(self._work(), name=f"knnclip-batcher-{i}") for i in range(self.workers)]

    async def submit(self, item: Item, timeout_s: float) -> Any:
        """The result of ``item``; raises :class:`Overloaded`, :class:`DeadlineExceeded`,
        :class:`ShuttingDown`, or the item's own exception."""
        if self._queue is None or self._closing:
            raise ShuttingDown("the server is shutting down")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(item, future, time.monotonic() + timeout_s))
        except asyncio.QueueFull:
            self.on_reject()
            raise Overloaded(self.max_queue, self.retry_after()) from None
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            future.cancel()  # a worker that has not started it skips it
            raise DeadlineExceeded(f"no answer within the request deadline of {timeout_s:g} s") from None
        except asyncio.CancelledError:  # the client went away
            future.cancel()
            raise

    def retry_after(self) -> int:
        """Seconds until the queue ahead of a new request has probably been worked off (>= 1)."""
        batches = math.ceil((self.depth + 1) / self.max_batch) / self.workers
        return max(1, math.ceil(batches * self._batch_seconds))

    async def stop(self) -> None:
        """Refuse new requests, finish the waiting ones, then stop the workers."""
        self._closing = True
        if self._queue is not None:
            await self._queue.join()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _work(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            live = [p for p in batch if not p.future.done() and p.deadline > time.monotonic()]
            for p in batch:
                if p not in live and not p.future.done():
                    p.future.set_exception(DeadlineExceeded("the request's deadline passed while it waited"))
            try:
                if live:
                    await self._run(loop, live)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _gather(self) -> list[_Pending[Item]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if self.in_flight == 0:  # idle: nothing else is coming sooner than this batch could finish
            return batch
        end = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, live: list[_Pending[Item]]) -> None:
        start = time.perf_counter()
        self.in_flight += len(live)
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in live])
        except Exception as exc:  # noqa: BLE001 - the batch function itself failed: every item gets the error
            results = [exc] * len(live)
        finally:
            self.in_flight -= len(live)
        seconds = time.perf_counter() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        self.on_batch(len(live), seconds)
        for p, result in zip(live, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
