"""Video: files, a stream served on loopback, standard input, dropped frames under --realtime, a
corrupt frame, a stalled source and Ctrl-C mid-file, on clips these tests encode with PyAV.
Outputs are read back: frame counts, timestamps, and JSON Lines equal to the in-memory results."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from knnclip.engine import Database, Segmenter
from knnclip.engine.demo.run import build_database
from knnclip.engine.demo.synthetic import make_split
from knnclip.engine.video.outputs import VideoOutputs
from knnclip.engine.video.pipeline import segment_video
from knnclip.engine.video.source import VideoSource, VideoSourceError

SIZE = (96, 128)
FPS = 10


def encode_clip(path: Path, frames: int, codec: str = "libx264", pix_fmt: str = "yuv420p", seed: int = 5) -> None:
    samples = make_split(frames, seed=seed, size=SIZE)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.height, stream.width = SIZE
        stream.pix_fmt = pix_fmt
        for s in samples:
            for packet in stream.encode(av.VideoFrame.from_ndarray(s.image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def decode_all(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def models(demo_models) -> Path:
    return demo_models


@pytest.fixture(scope="module")
def db(models, tmp_path_factory) -> Path:
    """A database with the synthetic classes' examples, so frames get segments."""
    return build_database(models, tmp_path_factory.mktemp("video-db") / "db", make_split(8, seed=1, size=SIZE))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    encode_clip(path, 12)
    return path


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knnclip.engine.cli", "segment", *args], capture_output=True, **kw)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_file_outputs_match_the_in_memory_results(models: Path, db: Path, clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = cli(
        str(clip),
        "--models",
        str(models),
        "--db",
        str(db),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--png-frames",
        text=True,
    )
    assert done.returncode == 0, done.stderr
    records = read_jsonl(out / "frames.jsonl")
    assert [r["frame"] for r in records] == list(range(12))
    np.testing.assert_allclose([r["time"] for r in records], np.arange(12) / FPS, atol=1e-6)
    assert len(decode_all(out / "annotated.mp4")) == 12 and len(list((out / "frames").glob("*.png"))) == 12
    with av.open(str(out / "annotated.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "h264" and float(c.streams.video[0].average_rate) == FPS
    frames = decode_all(clip)  # decoded independently, segmented in memory
    with Segmenter.from_dir(models, db, device="cpu", read_only=True, text_cache=None) as seg:
        expected = seg.segment_batch(frames, batch_size=4)
    assert sum(len(r["segments"]) for r in records) > 0
    for record, result in zip(records, expected, strict=True):
        assert [(s["id"], s["class"]) for s in record["segments"]] == [(s.id, s.name) for s in result.segments]
        for s in record["segments"]:
            mask = coco_mask.decode({"size": s["segmentation"]["size"], "counts": s["segmentation"]["counts"].encode()})
            np.testing.assert_array_equal(mask.astype(bool), result.panoptic == s["id"])
    report = json.loads((out / "report.json").read_text())
    assert report["frames_segmented"] == 12 and report["dropped"] == 0 and report["corrupt_frames"] == 0


class _ClipHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    stall_after: int | None = None

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "video/x-matroska")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.stall_after is None:
            self.wfile.write(self.body)
            return
        self.wfile.write(self.body[: self.stall_after])
        self.wfile.flush()
        time.sleep(30)  # the rest never comes

    def log_message(self, *args) -> None:
        pass


def serve(body: bytes, stall_after: int | None = None) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = type("Handler", (_ClipHandler,), {"body": body, "stall_after": stall_after})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/clip.mkv"


def test_stream_served_on_loopback(models: Path, db: Path, tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"
    encode_clip(path, 8)
    server, url = serve(path.read_bytes())
    try:
        done = cli(
            url,
            "--models",
            str(models),
            "--db",
            str(db),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--no-realtime",
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    assert [r["frame"] for r in read_jsonl(tmp_path / "out" / "frames.jsonl")] == list(range(8))


def test_standard_input(models: Path, db: Path, tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"  # Matroska streams without seeking
    encode_clip(path, 6)
    with path.open("rb") as stdin:
        done = cli(
            "-",
            "--models",
            str(models),
            "--db",
            str(db),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            stdin=stdin,
            text=True,
        )
    assert done.returncode == 0, done.stderr
    assert len(read_jsonl(tmp_path / "out" / "frames.jsonl")) == 6
    assert len(decode_all(tmp_path / "out" / "annotated.mp4")) == 6


@pytest.mark.parametrize("piped", ["truncated", "empty"])
def test_a_source_with_no_frame_is_an_error_that_names_nothing_unwritten(models, db, tmp_path, piped):
    """A file cut before its first frame, and an empty pipe: nothing to segment is a failure."""
    path = tmp_path / "clip.mkv"
    if piped == "truncated":
        encode_clip(path, 6)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(b"")
    out = tmp_path / "out"
    with path.open("rb") as stdin:
        done = cli(
            "-", "--models", str(models), "--db", str(db), "--out", str(out), "--device", "cpu", stdin=stdin, text=True
        )
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("knnclip")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "annotated" not in done.stdout + done.stderr
    assert not (out / "annotated.mp4").exists()
    if (out / "report.json").exists():
        assert "video" not in json.loads((out / "report.json").read_text())


class SlowSegmenter:
    """A real segmenter that takes longer per batch than a live source allows."""

    def __init__(self, seg: Segmenter, seconds: float) -> None:
        self.seg, self.seconds = seg, seconds

    def segment_batch(self, images, **kw):
        time.sleep(self.seconds)
        return self.seg.segment_batch(images, **kw)


class PacedSource(VideoSource):
    """A file decoded at its own frame rate, as a camera delivers it."""

    def __iter__(self):
        start = time.perf_counter()
        for frame in super().__iter__():
            time.sleep(max(0.0, start + frame.time - time.perf_counter()))
            yield frame


def test_realtime_drops_the_oldest_frames_and_the_newest_wins(models: Path, db: Path, tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    encode_clip(path, 40)
    seen: list[int] = []
    with Segmenter.from_dir(models, db, device="cpu", read_only=True, text_cache=None) as seg:
        report = segment_video(
            SlowSegmenter(seg, 0.3),
            PacedSource(str(path)),
            None,
            batch_size=2,
            realtime=True,
            on_result=lambda frame, result: seen.append(frame.index),
        )
    assert report.dropped > 0 and report.frames_read == 40
    assert report.frames_segmented + report.dropped == 40
    assert seen == sorted(seen) and seen[-1] == 39, "the newest frame is never the one dropped"


def test_files_are_processed_completely_even_when_slow(models: Path, db: Path, tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    encode_clip(path, 10)
    with Segmenter.from_dir(models, db, device="cpu", read_only=True, text_cache=None) as seg:
        report = segment_video(SlowSegmenter(seg, 0.05), VideoSource(str(path)), None, batch_size=2, stride=2)
    assert report.dropped == 0 and report.frames_segmented == 5 and report.skipped == 5


def test_corrupt_frame_is_skipped_and_counted(models: Path, db: Path, tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    encode_clip(path, 10, codec="png", pix_fmt="rgb24")  # every frame decoded on its own
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    data = bytearray(path.read_bytes())
    pos, size = packets[4]
    data[pos + size // 3 : pos + size // 3 + 40] = b"\xab" * 40
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    done = cli(str(path), "--models", str(models), "--db", str(db), "--out", str(out), "--device", "cpu", text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["corrupt_frames"] == 1 and report["frames_segmented"] == 9
    assert [r["frame"] for r in read_jsonl(out / "frames.jsonl")] == list(range(9))


def test_stalled_stream_is_reconnected_then_reported(models: Path, db: Path, tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"
    encode_clip(path, 30)
    body = path.read_bytes()
    server, url = serve(body, stall_after=len(body) // 2)
    try:
        source = VideoSource(url, timeout=0.5, reconnects=2, backoff=0.05)
        with Segmenter.from_dir(models, db, device="cpu", read_only=True, text_cache=None) as seg:
            report = segment_video(seg, source, None, batch_size=2)
    finally:
        server.shutdown()
        server.server_close()
    assert report.stalled and report.reconnects == 2 and "stalled" in report.error
    assert report.frames_segmented > 0


def test_unreadable_source_is_a_clear_error_before_anything_starts(models: Path, db: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(4096))
    for spec in (str(tmp_path / "missing.mp4"), str(garbage)):
        done = cli(spec, "--models", str(models), "--db", str(db), "--out", str(tmp_path / "out"), text=True)
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert spec in done.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(VideoSourceError, match="no such video file"):
        VideoSource(str(tmp_path / "missing.mp4"))


def test_ctrl_c_mid_file_leaves_a_playable_video(models: Path, db: Path, tmp_path: Path) -> None:
    path = tmp_path / "long.mp4"
    encode_clip(path, 300)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "knnclip.engine.cli",
            "segment",
            str(path),
            "--models",
            str(models),
            "--db",
            str(db),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "frames.jsonl").exists() and len((out / "frames.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    lines = read_jsonl(out / "frames.jsonl")
    frames = decode_all(out / "annotated.mp4")
    assert 5 <= len(lines) < 300 and len(frames) == len(lines), "every frame reported is in the playable video"


def test_vocabulary_grows_while_the_stream_runs(models: Path, db: Path, tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    encode_clip(path, 12)
    import shutil

    work = tmp_path / "db"
    shutil.copytree(db, work)
    vocab_sizes: list[int] = []
    with Segmenter.from_dir(models, work, device="cpu", text_cache=None) as seg:

        def on_result(frame, result) -> None:
            vocab_sizes.append(len(result.classes))
            if frame.index == 3:
                seg.add_class("lava")

        segment_video(
            seg, VideoSource(str(path)), VideoOutputs(tmp_path / "out", FPS, "h264"), batch_size=2, on_result=on_result
        )
    assert vocab_sizes[0] + 1 == vocab_sizes[-1], vocab_sizes
    with Database.open(work, read_only=True) as check:
        assert "lava" in check.classes


def test_the_clock_carries_on_where_timestamps_go_back():
    from knnclip.engine.video.source import ContinuousClock

    clock = ContinuousClock(0.2)
    times = [clock(t) for t in (0.0, 0.2, 0.4, 0.0, 0.2, 0.2, 1.0)]
    assert times == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.8]) and clock.resets == 2


@pytest.mark.parametrize("max_fps", [None, 5.0])
def test_concatenated_streams_are_segmented_whole(models: Path, db: Path, tmp_path: Path, max_fps) -> None:
    """Two MPEG-TS clips back to back: the second one's timestamps start again at 0."""
    parts = []
    for seed in (1, 2):
        path = tmp_path / f"part{seed}.ts"
        samples = make_split(6, seed=seed, size=SIZE)
        with av.open(str(path), "w", format="mpegts") as out:
            stream = out.add_stream("libx264", rate=FPS)
            stream.height, stream.width = SIZE
            stream.pix_fmt = "yuv420p"
            for s in samples:
                for packet in stream.encode(av.VideoFrame.from_ndarray(s.image, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        parts.append(path.read_bytes())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(parts))
    with Segmenter.from_dir(models, db, device="cpu", read_only=True) as seg:
        source = VideoSource(str(joined))
        report = segment_video(seg, source, None, max_fps=max_fps)
    assert report.frames_read == 12 and report.time_resets >= 1
    assert report.frames_segmented == (12 if max_fps is None else report.frames_read - report.skipped)
    assert report.frames_segmented >= 12 * min(1.0, (max_fps or FPS) / FPS) - 1, report
