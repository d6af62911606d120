"""``knnclip bench`` at the tiny size: both pipelines run in their own processes and the JSON,
Markdown and plot are written with every stage's percentiles."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from knnclip.engine.cpu_features import BF16_OVERRIDE, bf16_missing


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="the bf16 pipeline is OpenVINO's")
def test_without_bf16_the_bf16_pipeline_is_skipped_with_its_reason(monkeypatch):
    from knnclip.engine.bench.end_to_end import engine_pipelines

    monkeypatch.setenv(BF16_OVERRIDE, "0")
    pipelines = dict(engine_pipelines("cpu"))
    assert "without bfloat16" in pipelines["engine openvino bf16"]["skip"]
    assert all("skip" not in args for label, args in pipelines.items() if label != "engine openvino bf16")


def test_torch_best_stays_fp32_where_bf16_would_be_emulated(monkeypatch):
    import torch

    from knnclip.engine.bench.reference import fastest_precision

    cpu = torch.device("cpu")
    monkeypatch.setenv(BF16_OVERRIDE, "0")
    dtype, why = fastest_precision(torch, cpu)
    assert dtype == torch.float32 and why.startswith("fp32: ")
    monkeypatch.delenv(BF16_OVERRIDE)
    dtype, why = fastest_precision(torch, cpu)
    assert (dtype == torch.bfloat16) == (bf16_missing() is None), why


def test_bench_writes_under_its_work_folder_unless_told(tmp_path, monkeypatch):
    """A run from a checkout must not overwrite the committed results in benchmarks/results."""
    import argparse

    from knnclip.engine.cli import bench

    seen = {}

    def run_bench(preset, work, out, *args, **kwargs):
        seen["out"] = out
        return {"pipelines": {}}

    monkeypatch.setattr("knnclip.engine.bench.end_to_end.run_bench", run_bench)
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--quick", "--work", str(tmp_path / "w")])
    assert args.run(args) == 0 and seen["out"] == tmp_path / "w" / "results"


def test_bench_tiny(tmp_path):
    out = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "knnclip.engine.cli",
        "bench",
        "--preset",
        "tiny",
        "--work",
        str(tmp_path / "w"),
        "--out",
        str(out),
        "--name",
        "tiny",
        "--json",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "KNNCLIP_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr + done.stdout[-2000:]
    report = json.loads(done.stdout)
    assert set(report["pipelines"]) >= {"engine onnxruntime fp32", "torch reference"}
    no_bf16 = bf16_missing()
    if no_bf16 is not None and "engine openvino bf16" in report["pipelines"]:  # skipped, with the reason
        assert report["pipelines"].pop("engine openvino bf16") == {"skipped": no_bf16}
        assert "| engine openvino bf16 | skipped: " in (out / "tiny.md").read_text()
    best = report["pipelines"]["torch best"]["backends"]["all"]
    assert ("fp32: " if no_bf16 else "bf16 autocast") in best, best
    for label, pipeline in report["pipelines"].items():
        assert "error" not in pipeline and "skipped" not in pipeline, (label, pipeline)
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


def test_device_bench_dry_run_reports_what_crosses_between_host_and_device(tmp_path):
    """``--device cuda --dry-run``: the device pipeline's code on the CPU (torch tensors for the
    GPU's arrays), side by side with the host pipeline and the torch reference; the report has the
    bytes moved per image (only the image in, only results and the segment table out), batch
    throughput and the floor arithmetic."""
    out = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "knnclip.engine.cli",
        "bench",
        "--preset",
        "tiny",
        "--device",
        "cuda",
        "--dry-run",
        "--work",
        str(tmp_path / "w"),
        "--out",
        str(out),
        "--name",
        "dry",
        "--json",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "KNNCLIP_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr + done.stdout[-2000:]
    report = json.loads(done.stdout)
    assert report["dry_run"] and report["command"].endswith("--device cuda --dry-run")
    device = report["pipelines"]["engine device-path fp32 (dry run)"]
    moved = device["bytes_moved_per_image"]
    assert set(moved["to_device"]) <= {"image", "segments"} and moved["to_device"]["image"] > 0
    assert set(moved["to_host"]) <= {"result", "segments"} and moved["to_host"]["result"] > 0
    assert set(device["throughput_by_batch_images_per_s"]) == {"1", "4", "8"}
    assert report["pipelines"]["engine onnxruntime fp32"]["bytes_moved_per_image"] == {"to_device": {}, "to_host": {}}
    assert report["semantic_agreement_with_fp32"]["engine device-path fp32 (dry run)"] >= 0.999
    assert "skipped" in report["pipelines"]["torch best"] and "stages" in report["pipelines"]["torch reference"]
    floor = report["floor"]
    assert floor["floor_ms"] == max(floor["compute_ms"], floor["memory_ms"]) > 0 and floor["weight_bytes_fp16"] > 0
    assert "to the device per image" in (out / "dry.md").read_text()


def test_device_bench_without_a_gpu_exits_3_with_the_reason(tmp_path):
    from knnclip.engine.backends import cuda_usable

    if cuda_usable():
        return  # a GPU machine runs the real thing
    command = [
        sys.executable,
        "-m",
        "knnclip.engine.cli",
        "bench",
        "--preset",
        "tiny",
        "--device",
        "cuda",
        "--work",
        str(tmp_path / "w"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3 and "no model backend can run on a CUDA device" in done.stdout, done.stdout
    assert not (tmp_path / "w").exists(), "nothing is built for a run that cannot happen"
    dry_alone = subprocess.run(command[:-4] + ["--dry-run"], capture_output=True, text=True, timeout=300)
    assert dry_alone.returncode == 2 and "--device cuda" in dry_alone.stderr + dry_alone.stdout
