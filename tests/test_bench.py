"""``knnclip bench`` at the tiny size: both pipelines run in their own processes and the JSON,
Markdown and plot are written with every stage's percentiles."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the benchmark builds its models with torch (pip install torch)")
pytest.importorskip("onnx", reason="the benchmark exports to ONNX (pip install onnx)")


def test_bench_tiny(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "knnclip.engine.cli", "bench", "--preset", "tiny", "--work", str(tmp_path / "w"),
               "--out", str(out), "--name", "tiny", "--json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "KNNCLIP_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout[-2000:]
    report = json.loads(done.stdout)
    assert set(report["pipelines"]) >= {"engine onnxruntime fp32", "torch reference"}
    for label, pipeline in report["pipelines"].items():
        assert "error" not in pipeline, (label, pipeline)
        stages = pipeline["stages"]
        assert {"fcclip", "dinov2", "search", "postprocess", "total"} <= set(stages)
        assert all(0 <= s["p50"] <= s["p90"] <= s["p99"] for s in stages.values())
        assert stages["total"]["p50"] >= stages["fcclip"]["p50"]
        assert pipeline["peak_rss_mib"] > 10, "a worker holding models must show memory over its baseline"
    assert report["flops_per_image"]["fcclip"] > 1e8 and report["database"]["entries"] == 1000
    table = (out / "tiny.md").read_text()
    assert "reference / onnxruntime fp32" in table and "| total |" in table
    assert json.loads((out / "tiny.json").read_text())["command"] == "knnclip bench --preset tiny"
    assert (out / "tiny.png").stat().st_size > 1000
    if importlib.util.find_spec("openvino") is not None:  # auto's choice, per model, is in the report
        chosen = report["pipelines"]["engine auto fp32"]["backend_per_model"]
        assert set(chosen) == {"fcclip", "text", "dinov2"} and set(chosen.values()) <= {"onnxruntime", "openvino"}
        assert f"fcclip on {chosen['fcclip']}" in table
