"""Segmenting a video: a reader thread decodes, the calling thread runs the models on batches
(``Segmenter.segment_batch``), a writer thread draws and encodes, with bounded queues between
them, so decoding, inference and encoding overlap.

Files are processed completely: a full queue makes the reader wait. With ``realtime`` (live
sources) a full queue drops its oldest frame instead, so the newest frame wins and the engine
never falls further behind; dropped frames are counted. ``stride`` keeps every N-th frame and
``max_fps`` at most that many frames per second of video time.

The vocabulary can change while a stream runs (through the library or the server): each batch is
segmented with the database's vocabulary as it is when the batch starts.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from knnclip.engine.pipeline.results import Result
from knnclip.engine.video.outputs import VideoOutputs
from knnclip.engine.video.source import Frame, VideoSource

if TYPE_CHECKING:  # imported for its type only: the segmenter imports much of the engine
    from knnclip.engine.pipeline.segmenter import Segmenter

_END = object()


class FrameQueue:
    """A bounded FIFO between two threads that either waits when full or drops its oldest item."""

    def __init__(self, capacity: int, drop_oldest: bool) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._capacity, self._drop = max(1, capacity), drop_oldest
        self._cond = threading.Condition()
        self.dropped = 0
        self.closed = False

    def put(self, item: Any, *, force: bool = False) -> bool:
        """Add ``item``; False if the queue was closed meanwhile. ``force`` ignores the bound (end marks)."""
        with self._cond:
            while not force and len(self._items) >= self._capacity and not self.closed:
                if self._drop:
                    self._items.popleft()
                    self.dropped += 1
                    break
                self._cond.wait(0.1)
            if self.closed and not force:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, wait: bool = True) -> Any:
        """The oldest item; with ``wait=False`` None when there is none."""
        with self._cond:
            while not self._items:
                if not wait:
                    return None
                self._cond.wait(0.1)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


@dataclass
class VideoReport:
    source: str
    fps_source: float
    frames_read: int = 0
    frames_segmented: int = 0
    frames_failed: int = 0
    dropped: int = 0
    skipped: int = 0
    corrupt_frames: int = 0
    reconnects: int = 0
    time_resets: int = 0
    stalled: bool = False
    error: str | None = None
    interrupted: bool = False
    seconds: float = 0.0
    busy_seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "infer": 0.0, "write": 0.0})

    @property
    def fps(self) -> float:
        return self.frames_segmented / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fps": round(self.fps, 3)}


def segment_video(
    seg: Segmenter,
    source: VideoSource,
    outputs: VideoOutputs | None,
    *,
    batch_size: int = 4,
    stride: int = 1,
    max_fps: float | None = None,
    realtime: bool = False,
    overlap: bool = True,
    on_result: Callable[[Frame, Result | Exception], None] | None = None,
) -> VideoReport:
    """Segment every kept frame of ``source`` with ``seg`` and write it to ``outputs`` (and give it
    to ``on_result``). ``overlap=False`` runs decoding, inference and writing one after another in
    this thread (the baseline the benchmark compares with). Ctrl-C stops reading, finishes what
    was decoded and closes the outputs properly, then re-raises."""
    if batch_size < 1 or stride < 1 or (max_fps is not None and max_fps <= 0):
        raise ValueError("batch_size and stride must be >= 1, max_fps > 0")
    report = VideoReport(source.spec, source.fps)
    start = time.perf_counter()
    frames_in = FrameQueue(2 * batch_size, drop_oldest=realtime)
    results_out = FrameQueue(2 * batch_size, drop_oldest=False)
    stop = threading.Event()
    failure: list[BaseException] = []
    sampler = _Sampler(stride, max_fps, report)

    def emit(frame: Frame, result: Result | Exception) -> None:
        t = time.perf_counter()
        if outputs is not None:
            outputs.write(frame, result)
        if on_result is not None:
            on_result(frame, result)
        report.busy_seconds["write"] += time.perf_counter() - t

    def infer(batch: list[Frame]) -> list[tuple[Frame, Result | Exception]]:
        t = time.perf_counter()
        results = seg.segment_batch([f.image for f in batch], batch_size=batch_size)
        report.busy_seconds["infer"] += time.perf_counter() - t
        for result in results:
            if isinstance(result, Exception):
                report.frames_failed += 1
            else:
                report.frames_segmented += 1
        return list(zip(batch, results, strict=True))

    def read() -> None:
        try:
            t = time.perf_counter()
            for frame in source:
                report.busy_seconds["decode"] += time.perf_counter() - t
                if stop.is_set() or (sampler.keep(frame) and not frames_in.put(frame)):
                    break
                t = time.perf_counter()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            failure.append(exc)
        finally:
            frames_in.put(_END, force=True)

    def write() -> None:
        try:
            while (item := results_out.get()) is not _END:
                emit(*item)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            failure.append(exc)
            results_out.close()

    try:
        if not overlap:
            batch: list[Frame] = []
            t = time.perf_counter()
            for frame in source:
                report.busy_seconds["decode"] += time.perf_counter() - t
                if not sampler.keep(frame):
                    t = time.perf_counter()
                    continue
                batch.append(frame)
                if len(batch) == batch_size:
                    for item in infer(batch):
                        emit(*item)
                    batch = []
                t = time.perf_counter()
            for item in infer(batch) if batch else []:
                emit(*item)
        else:
            reader = threading.Thread(target=read, name="knnclip-video-reader", daemon=True)
            writer = threading.Thread(target=write, name="knnclip-video-writer", daemon=True)
            reader.start()
            writer.start()
            try:
                done = False
                while not done and not failure:
                    batch = []
                    while len(batch) < batch_size:
                        # a live source takes what has arrived; a file fills the batch
                        item = frames_in.get(wait=not batch or not realtime)
                        if item is None:
                            break
                        if item is _END:
                            done = True
                            break
                        batch.append(item)
                    for pair in infer(batch) if batch else []:
                        if not results_out.put(pair):
                            break
            except KeyboardInterrupt:
                report.interrupted = True
                raise
            finally:
                stop.set()
                frames_in.close()
                results_out.put(_END, force=True)
                writer.join()
                reader.join(timeout=5.0)
    except KeyboardInterrupt:
        report.interrupted = True
        raise
    finally:
        source.close()
        if outputs is not None:
            outputs.close()
        report.seconds = time.perf_counter() - start
        s = source.stats
        report.frames_read, report.corrupt_frames, report.reconnects = s.frames, s.corrupt_frames, s.reconnects
        report.time_resets = s.time_resets
        report.stalled, report.error = s.stalled, s.error
        report.dropped = frames_in.dropped
        if report.error is None and report.frames_read == 0 and not report.interrupted:
            # An empty pipe, a truncated file or bytes that are not a video: nothing to segment is a failure.
            report.error = f"{report.source}: the source yielded no video frame (empty, truncated, or not a video)"
    if failure:
        raise failure[0]
    return report


class _Sampler:
    """``stride`` and ``max_fps`` over the decoded frames, counting what it leaves out."""

    def __init__(self, stride: int, max_fps: float | None, report: VideoReport) -> None:
        self.stride, self.period, self.report = stride, (1.0 / max_fps if max_fps else 0.0), report
        self.last: float | None = None

    def keep(self, frame: Frame) -> bool:
        if self.last is not None and frame.time < self.last:  # a clock that went back restarts the spacing
            self.last = None
        if frame.index % self.stride or (self.last is not None and frame.time - self.last < self.period - 1e-6):
            self.report.skipped += 1
            return False
        self.last = frame.time
        return True
