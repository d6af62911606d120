"""The video pipeline's FrameQueue on its own, with real threads: waiting when full, dropping the
oldest in realtime, closing. Each test sets up its interleaving with events."""

from __future__ import annotations

import threading
import time

from knnclip.engine.video.pipeline import FrameQueue


def in_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


class TestFrameQueue:
    def test_dropping_keeps_the_newest_and_counts_the_rest(self):
        q = FrameQueue(2, drop_oldest=True)
        for i in range(5):
            assert q.put(i)
        assert [q.get(), q.get(), q.get(wait=False)] == [3, 4, None] and q.dropped == 3

    def test_a_full_waiting_queue_blocks_the_producer_until_the_consumer_takes(self):
        q, log = FrameQueue(1, drop_oldest=False), []
        q.put("a")
        producer = in_thread(lambda: (q.put("b"), log.append("b put")))
        time.sleep(0.15)
        assert log == [], "the producer waits while the queue is full"
        assert q.get() == "a"
        producer.join(5)
        assert log == ["b put"] and q.get() == "b" and q.dropped == 0

    def test_closing_releases_a_blocked_producer_and_refuses_more(self):
        q, outcome = FrameQueue(1, drop_oldest=False), []
        q.put("a")
        producer = in_thread(lambda: outcome.append(q.put("b")))
        time.sleep(0.15)
        q.close()
        producer.join(5)
        assert outcome == [False] and not q.put("c")
        assert q.put("end", force=True), "the end mark gets in past the bound and the close"
        assert [q.get(), q.get(), q.get(wait=False)] == ["a", "end", None]
