"""``knnclip segment``'s output files in a shared, hostile folder: links planted at their names are
replaced, never followed; inputs that share a stem or have very long names each get their own
files; one image that cannot be written fails alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from knnclip.engine.cli.segment import MAX_STEM_BYTES, output_stems
from knnclip.engine.demo.run import build_database
from knnclip.engine.demo.synthetic import make_split

SIZE = (96, 128)


@pytest.fixture(scope="module")
def db(demo_models, tmp_path_factory) -> Path:
    return build_database(demo_models, tmp_path_factory.mktemp("outputs-db") / "db", make_split(3, seed=1, size=SIZE))


def segment(demo_models: Path, db: Path, out: Path, *inputs: Path, extra: tuple[str, ...] = ()):
    command = [
        sys.executable,
        "-m",
        "knnclip.engine.cli",
        "segment",
        *map(str, inputs),
        "--models",
        str(demo_models),
        "--db",
        str(db),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--json",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def write_images(folder: Path, names: list[str]) -> list[Path]:
    paths = []
    for name, sample in zip(names, make_split(len(names), seed=2, size=SIZE), strict=True):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample.image).save(path)
        paths.append(path)
    return paths


def test_stems_are_distinct_and_short():
    long = "n" * 250
    stems = output_stems(["a/x.png", "b/x.png", "x.jpg", "x-2.png", f"{long}.png", f"{long}.jpg", "é" * 200 + ".png"])
    assert len(set(stems)) == len(stems) and stems[:3] == ["x", "x-2", "x-3"] and "x-2-2" in stems
    assert all(len(s.encode()) <= MAX_STEM_BYTES for s in stems)


def test_shared_stems_long_names_and_planted_links(demo_models, db, tmp_path):
    inputs = write_images(tmp_path / "in", ["a/x.png", "b/x.png", "x.jpg", "l" * 240 + ".png"])
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("x.json", "coco_instances.json", "x.semantic.png"):
        (out / name).symlink_to(victim)
    done = segment(demo_models, db, out, *inputs, extra=("--format", "json", "label-png", "coco-instances"))
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious"
    assert not (out / "x.json").is_symlink() and json.loads((out / "x.json").read_text())["segments"] is not None
    report = json.loads(done.stdout)
    stems = [r["outputs"] for r in report]
    assert len(set(stems)) == 4 and all((out / f"{s}.json").is_file() for s in stems)
    assert all((out / f"{s}.semantic.png").is_file() for s in stems)


def test_an_image_whose_outputs_cannot_be_written_fails_alone(demo_models, db, tmp_path):
    first, second = write_images(tmp_path / "in", ["first.png", "second.png"])
    out = tmp_path / "out"
    (out / "first.json").mkdir(parents=True)  # a folder where the file must go
    done = segment(demo_models, db, out, first, second)
    assert done.returncode == 1
    assert "first.png" in done.stderr and "Traceback" not in done.stderr
    assert json.loads((out / "second.json").read_text())["segments"] is not None


def test_video_outputs_do_not_follow_planted_links(demo_models, db, tmp_path):
    av = pytest.importorskip("av", reason="video needs PyAV")
    clip = tmp_path / "clip.mkv"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.height, stream.width = SIZE
        stream.pix_fmt = "yuv420p"
        for s in make_split(3, seed=4, size=SIZE):
            for packet in stream.encode(av.VideoFrame.from_ndarray(s.image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    for name in ("annotated.mp4", "frames.jsonl", "report.json"):
        (out / name).symlink_to(victim)
    done = segment(demo_models, db, out, clip)
    assert done.returncode == 0, done.stderr
    assert victim.read_bytes() == b"precious"
    assert len((out / "frames.jsonl").read_text().splitlines()) == 3
    with av.open(str(out / "annotated.mp4")) as container:
        assert len([f for f in container.decode(video=0)]) == 3
    assert np.asarray(json.loads((out / "report.json").read_text())["frames_segmented"]) == 3
