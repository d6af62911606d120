"""``knnclip demo`` as a user runs it: a fresh process, synthetic data, seeded models, and the
printed evidence that retrieval raises IoU on the classes added to the database."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_demo_runs_and_retrieval_raises_new_class_iou(tmp_path):
    env = {**os.environ, "KNNCLIP_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable,
        "-m",
        "knnclip.engine.cli",
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--train",
        "24",
        "--val",
        "8",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["miou_new_before"] == 0.0, "new classes cannot be predicted before they exist"
    assert report["miou_new_after"] > 0.1
    assert report["segments"] >= 0 and "total" in report["latency_ms_median"]
    overlays = sorted((tmp_path / "demo" / "overlays").glob("*.png"))
    assert len(overlays) == 4 and all(p.stat().st_size > 1000 for p in overlays)
    # A second run reuses the exported models and reproduces the numbers.
    again = json.loads(subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=True).stdout)
    assert again["classes"] == report["classes"]


def test_demo_says_what_the_weights_are(tmp_path):
    command = [
        sys.executable,
        "-m",
        "knnclip.engine.cli",
        "demo",
        "--out",
        str(tmp_path / "d"),
        "--train",
        "6",
        "--val",
        "2",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "KNNCLIP_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    assert "RANDOM" in done.stdout and "--fcclip" in done.stdout and "IoU per class" in done.stdout


def test_the_demo_runs_in_bf16_on_openvino_when_asked(tmp_path):
    ov = pytest.importorskip("openvino", reason="the bf16 demo needs openvino")
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bfloat16 arithmetic")
    bf16 = ["--sampling", "grid", "--backend", "openvino-bf16", "--search", "bf16"]
    command = [
        sys.executable,
        "-m",
        "knnclip.engine.cli",
        "demo",
        "--out",
        str(tmp_path / "d"),
        "--train",
        "12",
        "--val",
        "4",
        "--json",
        *bf16,
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "KNNCLIP_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["runtime"] == {
        "fcclip": "openvino",
        "text": "openvino",
        "dinov2": "openvino",
        "search": "Bf16SearchMirror",
    }
    assert report["miou_new_after"] > report["miou_new_before"]
    manifest = json.loads((tmp_path / "d" / "models" / "fcclip" / "image" / "manifest.json").read_text())
    assert manifest["sampling"] == "grid"
