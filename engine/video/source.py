"""Video sources through PyAV (FFmpeg): files, network streams (``rtsp://``, ``http(s)://``),
cameras (``/dev/videoN``) and standard input (``-``), as an iterator of decoded RGB frames with
their timestamps, the source's rotation applied.

A frame the decoder refuses is skipped and counted (``corrupt_frames``). A network source that
stalls past ``timeout`` seconds, or whose connection drops, is reopened up to ``reconnects`` times
with exponential backoff, then reported as stalled (``stalled``, ``error``). A source that cannot
be opened at all is a :class:`VideoSourceError` before any frame is read.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.errors import KnnclipError, needs_extra

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".ts", ".mts", ".mpg", ".mpeg", ".flv", ".wmv"}
_NETWORK = re.compile(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp|srt)://", re.IGNORECASE)


class VideoSourceError(KnnclipError):
    """A video source cannot be opened or read (the message names it and why)."""


def import_av() -> Any:
    try:
        import av
    except ImportError:
        raise needs_extra("video (PyAV: FFmpeg bindings with their own FFmpeg)", "video") from None
    return av


def is_video_source(spec: str) -> bool:
    """Whether ``spec`` names a video rather than an image: ``-``, a stream URL, a camera device,
    or a file with a video extension."""
    return (
        spec == "-"
        or bool(_NETWORK.match(spec))
        or spec.startswith("/dev/video")
        or (Path(spec).suffix.lower() in VIDEO_EXTENSIONS)
    )


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its index in the source (0, 1, ...), its time in seconds on one
    continuous clock (the stream's presentation time, carried on where timestamps go back), and
    pixels uint8 [H, W, 3] RGB, upright."""

    index: int
    time: float
    image: np.ndarray


@dataclass
class SourceStats:
    frames: int = 0
    corrupt_frames: int = 0
    reconnects: int = 0
    time_resets: int = 0  # timestamps that went back (concatenated streams, a camera restart, a reconnect)
    stalled: bool = False
    error: str | None = None


class ContinuousClock:
    """Maps presentation times that may go back (two streams one after the other, a camera or
    encoder restart, an RTSP reconnect) onto one increasing clock: where a time is not after the
    previous one, the clock carries on one frame period after the previous frame instead."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.offset = 0.0
        self.last: float | None = None
        self.resets = 0

    def __call__(self, t: float) -> float:
        mapped = t + self.offset
        if self.last is not None and mapped <= self.last:
            self.offset += self.last + self.period - mapped
            mapped = self.last + self.period
            self.resets += 1
        self.last = mapped
        return mapped


class VideoSource:
    """Decoded frames of one source; iterate once. ``fps``, ``width``, ``height`` and ``rotation``
    describe it (the size is after rotation); ``live`` is true for streams and cameras."""

    def __init__(self, spec: str, *, timeout: float = 10.0, reconnects: int = 3, backoff: float = 0.5) -> None:
        self.spec = spec
        self.live = bool(_NETWORK.match(spec)) or spec.startswith("/dev/video")
        self.network = bool(_NETWORK.match(spec))
        self.timeout, self.max_reconnects, self.backoff = timeout, reconnects, backoff
        self.stats = SourceStats()
        self._av = import_av()
        self._container = self._open()
        stream = self._video_stream(self._container)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.fps = float(rate) if rate else 25.0
        self.codec = stream.codec_context.name
        self._stream_rotation = _stream_rotation(stream)
        self.rotation = self._stream_rotation
        w, h = stream.codec_context.width, stream.codec_context.height
        self.width, self.height = (h, w) if self.rotation % 180 else (w, h)
        self._closed = threading.Event()

    def _open(self) -> Any:
        av = self._av
        options = {}
        try:
            if self.spec == "-":
                return av.open(sys.stdin.buffer, mode="r")
            if self.network:
                # FFmpeg's own socket timeout, in microseconds: a stalled read raises instead of hanging
                options = {"rw_timeout": str(int(self.timeout * 1e6)), "timeout": str(int(self.timeout * 1e6))}
                return av.open(self.spec, mode="r", options=options, timeout=(self.timeout, self.timeout))
            if not self.live and not os.path.isfile(self.spec):
                raise VideoSourceError(f"{self.spec}: no such video file")
            return av.open(self.spec, mode="r")
        except VideoSourceError:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise VideoSourceError(f"{self.spec}: cannot open the video ({exc})") from None

    def _video_stream(self, container: Any) -> Any:
        if not container.streams.video:
            container.close()
            raise VideoSourceError(f"{self.spec}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return stream

    def close(self) -> None:
        self._closed.set()
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - closing a broken stream must not mask the reason it broke
            pass

    def __iter__(self) -> Iterator[Frame]:
        av = self._av
        index = 0
        clock = ContinuousClock(1.0 / self.fps if self.fps > 0 else 1.0 / 30)
        while not self._closed.is_set():
            try:
                stream = self._video_stream(self._container)
                for packet in self._container.demux(stream):
                    if self._closed.is_set():
                        return
                    try:
                        decoded = packet.decode()
                    except av.error.FFmpegError:
                        self.stats.corrupt_frames += 1  # the decoder refused this packet: skip it
                        continue
                    for frame in decoded:
                        image = frame.to_ndarray(format="rgb24")
                        rotation = getattr(frame, "rotation", 0) or self._stream_rotation
                        if rotation % 360:
                            image = np.ascontiguousarray(np.rot90(image, k=int(rotation) // 90 % 4))
                        t = clock(float(frame.time) if frame.time is not None else index / self.fps)
                        self.stats.frames += 1
                        self.stats.time_resets = clock.resets
                        yield Frame(index, t, image)
                        index += 1
                return  # end of stream
            except (av.error.FFmpegError, OSError) as exc:
                if self._closed.is_set():
                    return
                if not self.network or not self._reconnect(exc):
                    return

    def _reconnect(self, exc: BaseException) -> bool:
        """Reopen a stalled or dropped network stream, with backoff; False once attempts run out."""
        with_reason = f"{type(exc).__name__}: {exc}"
        while self.stats.reconnects < self.max_reconnects and not self._closed.is_set():
            self.stats.reconnects += 1
            time.sleep(self.backoff * 2 ** (self.stats.reconnects - 1))
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - the old connection is gone either way
                pass
            try:
                self._container = self._open()
                return True
            except VideoSourceError as err:
                with_reason = str(err)
        self.stats.stalled = True
        self.stats.error = (
            f"{self.spec}: the stream stalled or dropped and {self.stats.reconnects} reconnects did not bring it "
            f"back ({with_reason})"
        )
        return False


def _stream_rotation(stream: Any) -> int:
    """Degrees counter-clockwise to turn frames upright, from the stream's metadata (older files
    carry ``rotate``; FFmpeg reports the display matrix on each frame, which wins when present)."""
    try:
        return -int(stream.metadata.get("rotate", 0)) % 360
    except (TypeError, ValueError):
        return 0
