"""What ``backend="auto"`` chooses on this CPU, and whether the choice holds up.

``python benchmarks/backend_choice.py --models knnclip-bench/models`` (the models
``knnclip bench --quick`` builds; ``knnclip-demo/models`` works too). For each of FC-CLIP's image
part, the CLIP text encoder and DINOv2, in a fresh engine cache:

1. ``open_session(part, "auto", "cpu")``: the choice, the timings it recorded and how long the
   first open (with its measurement) and a second open (reading the record) took;
2. a check of the choice by a longer measurement: ONNX Runtime and OpenVINO fp32 timed in
   alternating blocks (``timeit_interleaved``) on the same sample input, the ratio side by side,
   and the cost of the choice: its median over the faster one's (1.00: the choice was right).

Writes ``results/backend-choice-MACHINE.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine, timeit_interleaved, write_json, write_text

from knnclip.engine.bench.harness import machine_slug

PARTS = ("fcclip/image", "fcclip/text", "dinov2")


def measure(models: Path, repeats: int) -> dict[str, Any]:
    from knnclip.engine.artifact import read_manifest
    from knnclip.engine.backends import choice, open_session
    from knnclip.engine.cache import engine_cache_root

    out: dict[str, Any] = {}
    for part in PARTS:
        start = time.perf_counter()
        session = open_session(models / part, "auto", "cpu")
        first_open = time.perf_counter() - start
        chosen, selection = session.backend, session.selection
        session.close()
        start = time.perf_counter()
        open_session(models / part, "auto", "cpu").close()
        second_open = time.perf_counter() - start
        key = choice.machine_key(read_manifest(models / part), choice.CANDIDATES)
        record = json.loads(choice.record_path(engine_cache_root(), key).read_text())
        start = time.perf_counter()
        sessions = {"onnxruntime": open_session(models / part, "onnxruntime", "cpu")}
        named_open = time.perf_counter() - start
        sessions["openvino"] = open_session(models / part, "openvino", "cpu")
        feed = choice.sample_feed(sessions["onnxruntime"].inputs, sessions["onnxruntime"].manifest)
        timed = timeit_interleaved(
            {name: (lambda s=s, f=feed: s.infer(f)) for name, s in sessions.items()},
            {name: repeats for name in sessions},
        )
        for s in sessions.values():
            s.close()
        check = {name: 1e3 * t["median_s"] for name, t in timed.items()}
        out[part] = {
            "chosen": chosen,
            "selection": selection,
            "recorded_ms": record["ms"],
            "failed": record["failed"],
            "first_open_s": first_open,
            "second_open_s": second_open,
            "onnxruntime_open_s": named_open,
            "check_median_ms": check,
            "check_ratio_onnxruntime_over_openvino": check["onnxruntime"] / check["openvino"],
            # how much slower the choice is than the faster of the two in the longer check
            "cost_of_choice": check[chosen] / min(check.values()),
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f'# `backend="auto"` on the CPU: {m["name"]}',
        "",
        f"`{report['command']}`; {m['cpu']}, {m['cores']} cores; models from `{report['models']}`.",
        'Chosen by `open_session(part, "auto", "cpu")` in a fresh engine cache (fastest of at least 3 calls',
        "and 0.2 s after a warm-up, OpenVINO only when it takes at most 90% of ONNX Runtime's time);",
        f"checked by {report['repeats']} calls each in alternating blocks, median.",
        "",
        "| part | chosen | recorded ms (ORT / OV) | open (s): first auto / second auto / onnxruntime named | "
        "check median ms (ORT / OV) | ORT / OV | chosen / faster in the check |",
        "|---|---|---|---|---|---|---|",
    ]
    for part, r in report["parts"].items():
        rec, chk = r["recorded_ms"], r["check_median_ms"]
        lines.append(
            f"| {part} | {r['chosen']} | {rec.get('onnxruntime', float('nan')):.1f} / "
            f"{rec.get('openvino', float('nan')):.1f} | {r['first_open_s']:.1f} / {r['second_open_s']:.1f} / "
            f"{r['onnxruntime_open_s']:.1f} | "
            f"{chk['onnxruntime']:.1f} / {chk['openvino']:.1f} | {r['check_ratio_onnxruntime_over_openvino']:.2f}x | "
            f"{r['cost_of_choice']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("knnclip-bench/models"))
    parser.add_argument("--repeats", type=int, default=12, help="calls per backend in the check")
    parser.add_argument("--name", help="results file stem (default backend-choice-MACHINE)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KNNCLIP_ENGINE_CACHE"] = cache
        os.environ.pop("KNNCLIP_AUTO_MEASURE", None)
        parts = measure(args.models, args.repeats)
    report = {
        "command": f"python benchmarks/backend_choice.py --models {args.models} --repeats {args.repeats}",
        "models": str(args.models),
        "repeats": args.repeats,
        "machine": machine(),
        "parts": parts,
    }
    name = args.name or f"backend-choice-{machine_slug()}"
    write_json(name, report)
    write_text(f"{name}.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
