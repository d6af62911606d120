"""What segmenting a video writes into its output folder:

- ``annotated.mp4`` (or ``.webm`` for VP8/VP9 sources): every segmented frame with its labelled
  segments (:func:`knnclip.engine.render.plot`), in the source's codec family (H.264, MPEG-4,
  VP8/VP9; H.264 otherwise) at the rate of the frames kept, or a chosen codec. Closed properly
  even when the run is interrupted, so the file always plays.
- ``frames.jsonl``: one line per frame, in order: frame index, timestamp, and the result record
  of :mod:`knnclip.engine.formats` with each mask's COCO RLE (pycocotools' encoding), or the
  error of a frame that failed.
- ``frames/NNNNNN.png`` (optional): the same picture of each frame.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.errors import BackendUnavailableError
from knnclip.engine.formats import ResultWriter, result_record
from knnclip.engine.fsutil import open_new_file
from knnclip.engine.pipeline.results import Result
from knnclip.engine.render import plot
from knnclip.engine.video.source import Frame, import_av

ENCODERS = {"h264": "libx264", "mpeg4": "mpeg4", "vp8": "libvpx", "vp9": "libvpx-vp9"}


def frame_record(frame: Frame, result: Result | Exception) -> dict[str, Any]:
    """The JSON Lines record of one frame: its index and time, then the result record with each
    mask's COCO RLE (:func:`knnclip.engine.formats.result_record`), or the frame's error."""
    record: dict[str, Any] = {"frame": frame.index, "time": round(frame.time, 6)}
    if isinstance(result, Exception):
        record["error"] = str(result)
        return record
    return {**record, **result_record(result, masks=True)}


def encoder_for(source_codec: str, chosen: str | None, available: set[str]) -> tuple[str, str]:
    """(encoder, file suffix): the chosen encoder, else the source's family, else H.264, else MPEG-4."""
    if chosen:
        if chosen not in available:
            raise BackendUnavailableError(f"this FFmpeg has no {chosen!r} encoder; choose one of libx264, mpeg4")
        encoder = chosen
    else:
        encoder = ENCODERS.get(source_codec, "libx264")
        if encoder not in available:
            encoder = "libx264" if "libx264" in available else "mpeg4"
    return encoder, (".webm" if encoder.startswith("libvpx") else ".mp4")


class VideoOutputs:
    """The annotated video, the JSON Lines and the optional PNGs of one run; ``close()`` flushes
    the encoder and writes the container's trailer."""

    def __init__(
        self,
        out_dir: Path,
        fps: float,
        source_codec: str,
        classes: Mapping[int, str] | None = None,
        *,
        codec: str | None = None,
        pngs: bool = False,
        video: bool = True,
    ) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.fps, self.pngs, self.write_video = fps, pngs, video
        self._av = import_av()
        self.encoder, suffix = encoder_for(source_codec, codec, set(self._av.codecs_available))
        self.video_path = out_dir / f"annotated{suffix}"
        self.jsonl_path = out_dir / "frames.jsonl"
        self._jsonl = open_new_file(self.jsonl_path, "w")  # a link planted at the name is not followed
        self._video_file: Any = None
        self._container: Any = None
        self._stream: Any = None
        self._size: tuple[int, int] | None = None
        self.frames_written = 0
        # The frame PNGs are written as knnclip segment writes an image's overlay.
        self._frames = ResultWriter(out_dir / "frames", (), overlay=True, overlay_suffix=".png") if pngs else None

    def write(self, frame: Frame, result: Result | Exception) -> None:
        self._jsonl.write(json.dumps(frame_record(frame, result)) + "\n")
        self._jsonl.flush()
        if isinstance(result, Exception):
            return
        if not (self.write_video or self.pngs):
            return
        if self._frames is not None:
            self._frames.write(f"{frame.index:06d}", result, frame.image)
        if self.write_video:
            self._encode(plot(frame.image, result))

    def _encode(self, rgb: np.ndarray) -> None:
        av = self._av
        if self._container is None:
            h, w = rgb.shape[:2]
            self._size = (h + h % 2, w + w % 2)  # 4:2:0 chroma needs even sizes
            self._video_file = open_new_file(self.video_path, "wb")
            container_format = "webm" if self.video_path.suffix == ".webm" else "mp4"
            self._container = av.open(self._video_file, mode="w", format=container_format)
            rate = Fraction(self.fps).limit_denominator(1001)
            self._stream = self._container.add_stream(self.encoder, rate=rate)
            self._stream.height, self._stream.width = self._size
            self._stream.pix_fmt = "yuv420p"
        assert self._size is not None  # set with the container, above
        h, w = self._size
        if rgb.shape[:2] != (h, w):  # pad to the first frame's (even) size
            padded = np.zeros((h, w, 3), np.uint8)
            padded[: min(h, rgb.shape[0]), : min(w, rgb.shape[1])] = rgb[:h, :w]
            rgb = padded
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        if self._container is not None:
            try:
                for packet in self._stream.encode():  # flush the encoder's delayed frames
                    self._container.mux(packet)
            finally:
                self._container.close()
                self._container = None
                self._video_file.close()
        if not self._jsonl.closed:
            self._jsonl.close()
