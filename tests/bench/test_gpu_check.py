"""benchmarks/gpu_check.py, the script a GPU session runs, exercised here with CPU arrays on both
sides (--dry-run) so that a GPU session's few minutes are not lost to a bug in the harness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_dry_run_compares_every_op_and_writes_its_report(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--repeats", "1", "--no-faiss", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    ops = {(r["op"], r["dtype"]) for r in report["ops"]}
    assert {
        ("mask_pool", "float16"),
        ("semantic_merge", "float32"),
        ("retrieval_probs", "float32"),
        ("fuse", "float32"),
    } <= ops
    assert all(r["ok"] and r["max_rel_diff"] == 0.0 for r in report["ops"])  # same kernels on both sides
    assert sum("max_rel_diff_float64" in r for r in report["ops"]) >= 8  # and against the definitions
    assert report["errors"] and all(r["ok"] for r in report["errors"]), report["errors"]
    assert {r["op"] for r in report["decisions"]} == {"semantic_argmax", "panoptic_owner"}
    assert all(r["ok"] and min(r["agreement"]) == 1.0 for r in report["decisions"])
    assert "| mask_pool |" in (tmp_path / "gpu_check.md").read_text()


def test_dry_run_compares_the_device_pipeline_with_the_host_pipeline(tmp_path, demo_models):
    """With --models, the device-resident pipeline (torch tensors on the CPU in a dry run) against
    the host pipeline: every image agrees, and only images, constants, segment tables and results
    cross between host and "device"."""
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dry-run",
            "--repeats",
            "1",
            "--no-faiss",
            "--models",
            str(demo_models),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pipeline = json.loads((tmp_path / "gpu_check.json").read_text())["pipeline"]
    assert pipeline["ok"] and len(pipeline["images"]) == 3, pipeline
    assert all(r["semantic_agreement"] >= 0.999 and r["same_segments"] for r in pipeline["images"])
    moved = pipeline["bytes_moved_per_image"]
    assert moved["to_device"]["image"] > 0 and moved["to_host"]["result"] > 0
    assert set(moved["to_device"]) <= {"image", "segments"} and set(moved["to_host"]) <= {"result", "segments"}
    assert {"fcclip", "dinov2", "search", "postprocess"} <= set(pipeline["stages_ms"])
    assert "device-resident pipeline" in (tmp_path / "gpu_check.md").read_text()


def test_without_a_gpu_it_fails_with_the_reason_and_writes_nothing(tmp_path):
    from knnclip import _C

    if _C.cuda_available():
        return  # a GPU machine runs the real check instead
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3 and _C.cuda_status() in done.stdout and not list(tmp_path.iterdir())
    assert _C.cuda_status(), "the reason is never empty where no device is usable"
    skipped = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--skip-without-gpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert skipped.returncode == 0 and not list(tmp_path.iterdir())


def test_no_device_is_reported_even_without_pillow(tmp_path):
    """The device image may lack Pillow: nothing imported before the device check may need it."""
    from knnclip import _C

    if _C.cuda_available():
        return
    code = (
        f"import runpy, sys; sys.modules['PIL'] = None; sys.argv = [{str(SCRIPT)!r}, '--out', {str(tmp_path)!r}]; "
        f"sys.path.insert(0, {str(SCRIPT.parent)!r}); runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]


def test_sample_feeds_are_the_graphs_optimum_sizes(demo_models):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    import numpy as np

    from knnclip.engine.backends import open_session

    rng = np.random.default_rng(0)
    with open_session(demo_models / "fcclip" / "text", "onnxruntime", "cpu") as text:
        tokens = gpu_check.sample_feed(text, rng)["tokens"]
    assert tokens.shape == (28, 77) and tokens.min() >= 1
    session = open_session(demo_models / "fcclip" / "image", "onnxruntime", "cpu")
    images = gpu_check.sample_feed(session, rng)["images"]
    optimum = session.manifest.body.get("input_range", {}).get("opt")
    assert images.shape[2:] == (tuple(optimum) if optimum else tuple(session.manifest.body["input_size"]))
    session.close()
