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
from collections.abc import Callable, Iterator
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
    started: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def fps(self) -> float:
        return self.frames_segmented / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["started"]  # a clock reading, meaningless outside this process
        return {**data, "fps": round(self.fps, 3)}


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
    run = VideoRun(seg, source, outputs, batch_size, on_result, report, _Sampler(stride, max_fps, report))
    try:
        if overlap:
            OverlappedRunner(run, realtime).run()
        else:
            run_sequential(run)
    except KeyboardInterrupt:
        run.report.interrupted = True
        raise
    finally:
        run.finish()
    return run.report


@dataclass
class VideoRun:
    """One video's run: what it reads, segments and writes, and the report it keeps. A runner
    decides what runs where (:func:`run_sequential`, :class:`OverlappedRunner`)."""

    seg: Segmenter
    source: VideoSource
    outputs: VideoOutputs | None
    batch_size: int
    on_result: Callable[[Frame, Result | Exception], None] | None
    report: VideoReport
    sampler: _Sampler
    dropped: int = 0

    def kept_frames(self) -> Iterator[Frame]:
        """The source's frames that the sampler keeps, their decoding timed."""
        t = time.perf_counter()
        for frame in self.source:
            self.report.busy_seconds["decode"] += time.perf_counter() - t
            if self.sampler.keep(frame):
                yield frame
            t = time.perf_counter()

    def infer(self, batch: list[Frame]) -> list[tuple[Frame, Result | Exception]]:
        if not batch:
            return []
        t = time.perf_counter()
        results = self.seg.segment_batch([f.image for f in batch], batch_size=self.batch_size)
        self.report.busy_seconds["infer"] += time.perf_counter() - t
        failed = sum(isinstance(r, Exception) for r in results)
        self.report.frames_failed += failed
        self.report.frames_segmented += len(results) - failed
        return list(zip(batch, results, strict=True))

    def emit(self, frame: Frame, result: Result | Exception) -> None:
        t = time.perf_counter()
        if self.outputs is not None:
            self.outputs.write(frame, result)
        if self.on_result is not None:
            self.on_result(frame, result)
        self.report.busy_seconds["write"] += time.perf_counter() - t

    def finish(self) -> None:
        """Close the source and the outputs, and complete the report from the source's counts."""
        report = self.report
        self.source.close()
        if self.outputs is not None:
            self.outputs.close()
        report.seconds = time.perf_counter() - report.started
        s = self.source.stats
        report.frames_read, report.corrupt_frames, report.reconnects = s.frames, s.corrupt_frames, s.reconnects
        report.time_resets, report.stalled, report.error = s.time_resets, s.stalled, s.error
        report.dropped = self.dropped
        if report.error is None and report.frames_read == 0 and not report.interrupted:
            # An empty pipe, a truncated file or bytes that are not a video: nothing to segment is a failure.
            report.error = f"{report.source}: the source yielded no video frame (empty, truncated, or not a video)"


def run_sequential(run: VideoRun) -> None:
    """Decode, segment and write one after another, in this thread."""
    batch: list[Frame] = []
    for frame in run.kept_frames():
        batch.append(frame)
        if len(batch) == run.batch_size:
            for pair in run.infer(batch):
                run.emit(*pair)
            batch = []
    for pair in run.infer(batch):
        run.emit(*pair)


class OverlappedRunner:
    """A reader thread decodes into a bounded queue, this thread segments batches from it, and a
    writer thread writes from a second queue. With ``realtime`` the first queue drops its oldest
    frame when full and a batch takes what has arrived; otherwise the reader waits and batches fill.
    An error in either thread stops the run and is raised here."""

    def __init__(self, run: VideoRun, realtime: bool) -> None:
        self.run_, self.realtime = run, realtime
        self.frames_in = FrameQueue(2 * run.batch_size, drop_oldest=realtime)
        self.results_out = FrameQueue(2 * run.batch_size, drop_oldest=False)
        self.stop = threading.Event()
        self.failure: list[BaseException] = []
        self.reader_done = False  # the end mark was taken from frames_in

    def run(self) -> None:
        reader = threading.Thread(target=self._read, name="knnclip-video-reader", daemon=True)
        writer = threading.Thread(target=self._write, name="knnclip-video-writer", daemon=True)
        reader.start()
        writer.start()
        try:
            while not self.failure and (batch := self._next_batch()) is not None:
                for pair in self.run_.infer(batch):
                    if not self.results_out.put(pair):
                        break
        finally:
            self.stop.set()
            self.frames_in.close()
            self.results_out.put(_END, force=True)
            writer.join()
            reader.join(timeout=5.0)
            self.run_.dropped = self.frames_in.dropped
        if self.failure:
            raise self.failure[0]

    def _next_batch(self) -> list[Frame] | None:
        """Up to a batch of frames; None once the reader has finished and nothing is left."""
        batch: list[Frame] = []
        while not self.reader_done and len(batch) < self.run_.batch_size:
            # a live source takes what has arrived; a file fills the batch
            item = self.frames_in.get(wait=not batch or not self.realtime)
            if item is None:
                break
            if item is _END:
                self.reader_done = True
                break
            batch.append(item)
        return batch or None

    def _read(self) -> None:
        try:
            for frame in self.run_.kept_frames():
                if self.stop.is_set() or not self.frames_in.put(frame):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            self.failure.append(exc)
        finally:
            self.frames_in.put(_END, force=True)

    def _write(self) -> None:
        try:
            while (item := self.results_out.get()) is not _END:
                self.run_.emit(*item)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            self.failure.append(exc)
            self.results_out.close()


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
