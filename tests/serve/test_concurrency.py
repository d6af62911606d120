"""The service's concurrency primitives on their own, with fake work: the Batcher (dynamic
batching, overload, deadlines, draining) and the phase-fair ReadWriteLock. Each test sets up the
interleaving it checks with events, so none depends on a scheduler's luck."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from knnclip.engine.serve.batcher import Batcher, DeadlineExceeded, Overloaded, ShuttingDown
from knnclip.engine.serve.service import ReadWriteLock


class FakeBatches:
    """A batch function that records its batches; the first one waits for ``release``."""

    def __init__(self, hold_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items: list[int]) -> list[object]:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(10)
        return [ValueError(f"item {i} is bad") if i < 0 else i * 10 for i in items]


def run(coroutine):
    return asyncio.run(coroutine)


class TestBatcher:
    def test_requests_that_wait_during_a_batch_form_the_next_one(self):
        work = FakeBatches(hold_first=True)

        async def scenario():
            batcher = Batcher(work, max_batch=4, max_wait_s=0.0, max_queue=16)
            batcher.start()
            first = asyncio.create_task(batcher.submit(1, 10))
            await asyncio.to_thread(work.started.wait, 10)  # a lone request starts at once
            rest = [asyncio.create_task(batcher.submit(i, 10)) for i in range(2, 8)]
            await asyncio.sleep(0.05)  # all six are queued while the first batch runs
            work.release.set()
            results = await asyncio.gather(first, *rest)
            await batcher.stop()
            return results

        assert run(scenario()) == [10, 20, 30, 40, 50, 60, 70]
        assert work.batches == [[1], [2, 3, 4, 5], [6, 7]], "the oldest first, at most max_batch at a time"

    def test_a_full_queue_refuses_at_once_with_a_retry_time(self):
        work = FakeBatches(hold_first=True)
        rejected = []

        async def scenario():
            batcher = Batcher(work, max_batch=1, max_queue=2, on_reject=lambda: rejected.append(1))
            batcher.start()
            running = asyncio.create_task(batcher.submit(0, 10))
            await asyncio.to_thread(work.started.wait, 10)
            queued = [asyncio.create_task(batcher.submit(i, 10)) for i in (1, 2)]
            await asyncio.sleep(0.05)
            start = time.monotonic()
            with pytest.raises(Overloaded) as info:
                await batcher.submit(3, 10)
            waited = time.monotonic() - start
            work.release.set()
            await asyncio.gather(running, *queued)
            await batcher.stop()
            return info.value, waited

        error, waited = run(scenario())
        assert waited < 0.5 and error.retry_after >= 1 and rejected == [1]
        assert work.batches == [[0], [1], [2]], "the refused request cost no work"

    def test_each_item_gets_its_own_result_or_error(self):
        async def scenario():
            batcher = Batcher(FakeBatches(), max_batch=3, max_wait_s=0.0)
            batcher.start()
            outcomes = await asyncio.gather(*(batcher.submit(i, 10) for i in (1, -1, 2)), return_exceptions=True)
            await batcher.stop()
            return outcomes

        good, bad, other = run(scenario())
        assert good == 10 and other == 20 and isinstance(bad, ValueError) and "item -1" in str(bad)

    def test_a_failing_batch_function_fails_every_item_of_its_batch(self):
        def broken(items):
            raise RuntimeError("the model crashed")

        async def scenario():
            batcher = Batcher(broken, max_batch=2)
            batcher.start()
            outcomes = await asyncio.gather(*(batcher.submit(i, 10) for i in (1, 2)), return_exceptions=True)
            await batcher.stop()
            return outcomes

        assert all(isinstance(o, RuntimeError) and "crashed" in str(o) for o in run(scenario()))

    def test_a_request_whose_deadline_passes_in_the_queue_costs_no_work(self):
        work = FakeBatches(hold_first=True)

        async def scenario():
            batcher = Batcher(work, max_batch=1, max_queue=4)
            batcher.start()
            running = asyncio.create_task(batcher.submit(1, 10))
            await asyncio.to_thread(work.started.wait, 10)
            late = asyncio.create_task(batcher.submit(2, 0.05))
            with pytest.raises(DeadlineExceeded):
                await late
            work.release.set()
            await running
            await batcher.stop()

        run(scenario())
        assert work.batches == [[1]], "the expired request never reached the batch function"

    def test_stop_finishes_the_waiting_requests_then_refuses_new_ones(self):
        work = FakeBatches(hold_first=True)

        async def scenario():
            batcher = Batcher(work, max_batch=1, max_queue=4)
            batcher.start()
            pending = [asyncio.create_task(batcher.submit(i, 10)) for i in (1, 2, 3)]
            await asyncio.to_thread(work.started.wait, 10)
            stopping = asyncio.create_task(batcher.stop())
            await asyncio.sleep(0.05)
            with pytest.raises(ShuttingDown):
                await batcher.submit(4, 10)
            work.release.set()
            await stopping
            return await asyncio.gather(*pending)

        assert run(scenario()) == [10, 20, 30] and work.batches == [[1], [2], [3]]


def in_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


class TestReadWriteLock:
    def test_readers_share_and_a_writer_is_alone(self):
        lock, log = ReadWriteLock(), []
        lock.acquire_read()
        second = in_thread(lambda: (lock.acquire_read(), log.append("reader 2"), lock.release_read()))
        second.join(5)
        assert log == ["reader 2"], "a second reader does not wait for the first"
        writer = in_thread(lambda: (lock.acquire_write(), log.append("writer"), lock.release_write()))
        time.sleep(0.1)
        assert log == ["reader 2"], "the writer waits for the reader"
        lock.release_read()
        writer.join(5)
        assert log == ["reader 2", "writer"]

    def test_a_waiting_writer_holds_off_new_readers(self):
        lock, log = ReadWriteLock(), []
        lock.acquire_read()
        writer = in_thread(lambda: (lock.acquire_write(), log.append("writer"), lock.release_write()))
        time.sleep(0.1)  # the writer is waiting for the first reader
        late = in_thread(lambda: (lock.acquire_read(), log.append("late reader"), lock.release_read()))
        time.sleep(0.1)
        assert log == [], "the late reader does not overtake the waiting writer"
        lock.release_read()
        writer.join(5)
        late.join(5)
        assert log == ["writer", "late reader"]

    def test_readers_waiting_for_a_writer_go_before_the_next_writer(self):
        lock, log = ReadWriteLock(), []
        lock.acquire_write()
        readers = [
            in_thread(
                lambda n=n: (lock.acquire_read(), log.append(f"reader {n}"), time.sleep(0.05), lock.release_read())
            )
            for n in (1, 2)
        ]
        time.sleep(0.1)
        writer = in_thread(lambda: (lock.acquire_write(), log.append("writer 2"), lock.release_write()))
        time.sleep(0.1)
        lock.release_write()
        for t in [*readers, writer]:
            t.join(5)
        assert sorted(log[:2]) == ["reader 1", "reader 2"] and log[2] == "writer 2", log
