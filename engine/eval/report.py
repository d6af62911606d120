"""Evaluation reports: JSON (everything), a Markdown table, and a PNG plot when matplotlib is
installed (mIoU per step for the continual protocol; the most confused class pairs otherwise)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from knnclip.engine.fsutil import atomic_write_bytes
from knnclip.engine.render import pyplot


def write_report(report: dict[str, Any], out_dir: str | Path, name: str) -> list[Path]:
    """Write ``name.json``, ``name.md`` and (with matplotlib) ``name.png``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    atomic_write_bytes(paths[0], json.dumps(report, indent=1).encode())
    atomic_write_bytes(paths[1], markdown(report).encode())
    if _plot(report, out / f"{name}.png"):
        paths.append(out / f"{name}.png")
    return paths


def _fmt(value: float | None, scale: float = 100.0) -> str:
    return "-" if value is None else f"{value * scale:.1f}"


def markdown(report: dict[str, Any]) -> str:
    kind = report.get("protocol")
    if kind == "continual":
        return _continual_md(report)
    if kind == "sweep":
        return _sweep_md(report)
    if kind == "instance":
        return _instance_md(report)
    return _semantic_md(report)


def _instance_md(report: dict[str, Any]) -> str:
    r = report["result"]
    lines = _header(report, "Instance evaluation")
    lines += ["| metric | value |", "|---|---|"]
    for key, label in (
        ("ap", "mask AP"),
        ("ap50", "AP50"),
        ("ap75", "AP75"),
        ("ap_small", "AP small"),
        ("ap_medium", "AP medium"),
        ("ap_large", "AP large"),
    ):
        lines.append(f"| {label} | {_fmt(r[key] if r[key] >= 0 else None)} |")
    lines.append(f"| instances / detections / images | {r['instances']} / {r['detections']} / {r['images']} |")
    return "\n".join(lines) + "\n"


def _header(report: dict[str, Any], title: str) -> list[str]:
    ds = report["dataset"]
    lines = [f"# {title}: {ds.get('key', ds.get('val', ''))}", ""]
    lines.append("Dataset: " + ", ".join(f"{k} {v}" for k, v in ds.items()))
    if "retrieval" in report:
        lines.append("Retrieval: " + ", ".join(f"{k}={v}" for k, v in report["retrieval"].items()))
    lines.append("")
    return lines


def _semantic_md(report: dict[str, Any]) -> str:
    r = report["result"]
    lines = _header(report, "Evaluation")
    lines += ["| metric | value |", "|---|---|"]
    lines.append(f"| mIoU | {_fmt(r['miou'])} |")
    lines.append(f"| pixel accuracy | {_fmt(r['pixel_accuracy'])} |")
    lines.append(f"| classes scored | {r['classes_scored']} |")
    for group, values in r.get("panoptic", {}).items():
        lines.append(
            f"| PQ / SQ / RQ ({group}, n={values['n']}) | {_fmt(values['pq'])} / {_fmt(values['sq'])} / "
            f"{_fmt(values['rq'])} |"
        )
    lines.append(f"| images, seconds | {r['images']}, {r['seconds']:.1f} |")
    lines += ["", "IoU per class (x100):", "", "| class | IoU |", "|---|---|"]
    lines += [f"| {name} | {_fmt(v)} |" for name, v in r["iou"].items()]
    if r["most_confused"]:
        lines += ["", "Most confused (true -> predicted, pixels):", ""]
        lines += [f"- {c['true']} -> {c['predicted']}: {c['pixels']}" for c in r["most_confused"]]
    return "\n".join(lines) + "\n"


def _continual_md(report: dict[str, Any]) -> str:
    lines = _header(report, "Continual vocabulary")
    lines += [
        "| step | classes added | seen | entries | code bytes | mIoU | old | new | forgetting |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        forgetting = s.get("forgetting", {}).get("miou_drop")
        shown = ", ".join(s["classes"][:4]) + (" ..." if len(s["classes"]) > 4 else "")
        lines.append(
            f"| {s['step']} | {shown} | {s['seen']} | {s['database']['entries']} | {s['database']['code_bytes']} "
            f"| {_fmt(s['miou'])} | {_fmt(s['miou_old'])} | {_fmt(s['miou_new'])} | {_fmt(forgetting)} |"
        )
    lines += [
        "",
        f"Final mIoU {_fmt(report['final_miou'])}; forgetting (mIoU x100 lost by old classes on their "
        f"own task): mean {_fmt(report['mean_forgetting'])}, max {_fmt(report['max_forgetting'])}; "
        f"identical results on every old task: {report['zero_forgetting']}.",
    ]
    return "\n".join(lines) + "\n"


def _sweep_md(report: dict[str, Any]) -> str:
    lines = _header(report, "Retrieval sweep")
    best = report["best"]
    keys = ("fusion", "k", "tau", "T", "lam")
    lines.append(
        "Best: "
        + ", ".join(f"{k}={best['config'][k]}" for k in keys)
        + f" with mIoU {_fmt(best['miou'])} (base FC-CLIP without retrieval: {_fmt(report['base_miou'])})."
    )
    for placement in dict.fromkeys(r["config"]["fusion"] for r in report["grid"]):
        rows = [r for r in report["grid"] if r["config"]["fusion"] == placement]
        best_of = max(rows, key=lambda r: -1.0 if r["miou"] is None else r["miou"])
        lines.append(f"Best with fusion={placement}: mIoU {_fmt(best_of['miou'])}.")
    lines += ["", "| fusion | k | tau | T | lam | mIoU |", "|---|---|---|---|---|---|"]
    for row in sorted(report["grid"], key=lambda r: -(r["miou"] or 0))[:20]:
        c = row["config"]
        lines.append(f"| {c['fusion']} | {c['k']} | {c['tau']} | {c['T']} | {c['lam']} | {_fmt(row['miou'])} |")
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    kind = report.get("protocol")
    if kind == "continual":
        steps = [s["step"] for s in report["steps"]]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in (("miou", "seen classes"), ("miou_old", "old classes"), ("miou_new", "new classes")):
            values = [s[key] * 100 if s[key] is not None else float("nan") for s in report["steps"]]
            ax.plot(steps, values, marker="o", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("mIoU (%)")
        ax.set_xticks(steps)
        ax.legend()
    elif kind == "sweep":
        rows = sorted(report["grid"], key=lambda r: -(r["miou"] or 0))[:15]
        fig, ax = plt.subplots(figsize=(7, 0.8 + 0.3 * len(rows)))
        labels = [
            f"k={r['config']['k']} tau={r['config']['tau']} T={r['config']['T']} lam={r['config']['lam']}" for r in rows
        ]
        ax.barh(labels, [(r["miou"] or 0) * 100 for r in rows])
        ax.axvline(
            report["base_miou"] * 100 if report["base_miou"] is not None else 0,
            color="k",
            ls="--",
            label="no retrieval",
        )
        ax.set_xlabel("mIoU (%)")
        ax.invert_yaxis()
        ax.legend(fontsize=7)
    elif kind == "instance":
        r = report["result"]
        names = [k for k in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large") if r[k] >= 0]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(names, [r[k] * 100 for k in names])
        ax.set_ylabel("mask AP (%)")
    else:
        pairs = report["result"]["most_confused"]
        if not pairs:
            return False
        fig, ax = plt.subplots(figsize=(7, 0.8 + 0.3 * len(pairs)))
        ax.barh([f"{p['true']} -> {p['predicted']}" for p in pairs], [p["pixels"] for p in pairs])
        ax.set_xlabel("pixels (most confused class pairs)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
