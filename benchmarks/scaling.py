"""How the engine's per-image cost after the models scales: with the number of query masks,
with the image size, and (memory and search) with the database's size and storage type.

    python benchmarks/scaling.py            # databases up to 10^6 entries
    python benchmarks/scaling.py --quick    # databases up to 10^5 (a few minutes on 2 cores)

The models run at their export size whatever the image (images are resized to it), so their
time does not move with the image size; what does is everything after them, timed here with
the engine's own functions on random inputs of the real shapes: mask pooling of DINOv2
ViT-g/14 keys (1536x37x37), the search (flat fp16 database, k=10), retrieval scoring and fusion
(150 classes), and post-processing (masks resized to the image, semantic and panoptic inference).
FC-CLIP's masks are at stride 4 of its 640x864 padded input (160x216). Each database size and
storage runs in its own process so that its resident memory can be read.
Writes benchmarks/results/scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, machine, pyplot, spawn, time_calls, write_json, write_text

DIM, CLASSES, K = 1536, 150, 10
MASKS_HW = (160, 216)
PADDED, RESIZED = (640, 864), (640, 853)


def _time(fn: Any, repeats: int) -> dict[str, float]:
    return time_calls(fn, warmup=1, repeats=repeats)


def _database(path: Path, n: int, storage: str, rng: np.random.Generator):
    from knnclip.engine import Database

    db = Database.create(path, DIM, storage=storage)
    for c in range(CLASSES):
        db.add_class(f"class{c}")
    centres = rng.standard_normal((CLASSES, DIM)).astype(np.float32)

    def batch(m: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, CLASSES, m)
        return centres[labels] + 0.6 * rng.standard_normal((m, DIM), dtype=np.float32), labels

    if db.index_spec.needs_training:
        db.train(batch(20000)[0])
    for start in range(0, n, 20000):
        db.add(*batch(min(20000, n - start)))
    db.close(checkpoint=True)
    return centres


def stages_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-stage times for each query count and each image size, over one 10^5-entry database."""
    from knnclip.engine import Database, ops
    from knnclip.engine.pipeline import postprocess

    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="knnclip-scaling-"))
    _database(work / "db", spec["entries"], "fp16", rng)
    db = Database.open(work / "db", read_only=True)
    keys = rng.standard_normal((DIM, 37, 37)).astype(np.float32)
    is_thing = [c % 2 == 0 for c in range(CLASSES)]
    r = spec["repeats"]

    def measure(queries: int, output: tuple[int, int]) -> dict[str, Any]:
        masks = rng.standard_normal((queries, *MASKS_HW)).astype(np.float32) * 4
        base = rng.dirichlet(np.ones(CLASSES), queries).astype(np.float32)
        valid = np.ascontiguousarray(masks[:, : -(-RESIZED[0] // 4), : -(-RESIZED[1] // 4)])  # unpadded part
        pooled = ops.mask_pool(keys, valid)
        sims, labels, _ = db.search(pooled, K)
        p_ret = ops.retrieval_probs(sims, labels, CLASSES, 0.05)
        mask_cls = np.concatenate([ops.fuse(base, p_ret, 0.5, 0.5), np.full((queries, 1), 1e-3, np.float32)], 1)
        full = postprocess.resize_masks(masks, PADDED, RESIZED, output)
        return {
            "queries": queries,
            "image": list(output),
            "pool": _time(lambda: ops.mask_pool(keys, valid), r),
            "search": _time(lambda: db.search(pooled, K), r),
            "fuse": _time(lambda: ops.fuse(base, ops.retrieval_probs(sims, labels, CLASSES, 0.05), 0.5, 0.5), r),
            "resize": _time(lambda: postprocess.resize_masks(masks, PADDED, RESIZED, output), r),
            "semantic": _time(lambda: postprocess.semantic_labels(postprocess.semantic_probs(mask_cls), full), r),
            "panoptic": _time(lambda: postprocess.panoptic_inference(mask_cls, full, is_thing, 0.0, 0.8), r),
        }

    rows = [measure(q, tuple(spec["image"])) for q in spec["queries"]]
    rows += [measure(spec["queries"][-1], tuple(size)) for size in spec["sizes"]]
    db.close()
    return {"rows": rows}


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Resident memory of an opened database of ``n`` entries, and its search latency."""
    from knnclip.engine import Database
    from knnclip.engine.bench.harness import peak_rss_mib

    rng = np.random.default_rng(1)
    work = Path(tempfile.mkdtemp(prefix="knnclip-scaling-"))
    _database(work / "db", spec["entries"], spec["storage"], rng)
    queries = rng.standard_normal((250, DIM)).astype(np.float32)
    rss_before = _rss_mib()
    db = Database.open(work / "db", read_only=True)
    rss_open = _rss_mib()
    search = _time(lambda: db.search(queries, K), spec["repeats"])
    result = {
        "entries": spec["entries"],
        "storage": spec["storage"],
        "rss_mib": rss_open - rss_before,
        "rss_after_search_mib": _rss_mib() - rss_before,
        "peak_rss_mib": peak_rss_mib(),
        "code_bytes": db.stats()["code_bytes_per_entry"] * spec["entries"],
        "search": search,
    }
    db.close()
    return result


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _spawn(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    result = spawn(__file__, {"kind": kind, **spec})
    if "error" in result:
        raise RuntimeError(f"{kind} worker failed: {result['error']}")
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Scaling of the per-image work after the models",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores. Produced by `{result['command']}`. median ms over "
        f"{result['settings']['repeats']} runs after a warm-up; random inputs of the real shapes (see the script).",
        "",
        "## Against the number of query masks (image 512x683, database 10^5 fp16 entries)",
        "",
        "| queries | pool | search | fuse | resize | semantic | panoptic | sum |",
        "|---|---|---|---|---|---|---|---|",
    ]
    stages = ("pool", "search", "fuse", "resize", "semantic", "panoptic")
    n_q = len(result["settings"]["queries"])
    for row in result["stages"][:n_q]:
        cells = [row[s]["median_s"] * 1e3 for s in stages]
        lines.append(f"| {row['queries']} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(cells):.1f} |")
    lines += [
        "",
        "## Against the image size (250 queries)",
        "",
        "| image | pool | search | fuse | resize | semantic | panoptic | sum |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["stages"][n_q:]:
        cells = [row[s]["median_s"] * 1e3 for s in stages]
        lines.append(
            f"| {row['image'][0]}x{row['image'][1]} | "
            + " | ".join(f"{c:.1f}" for c in cells)
            + f" | {sum(cells):.1f} |"
        )
    lines += [
        "",
        "## Database memory and search against size and storage (flat index, 250 queries, k=10)",
        "",
        "| storage | entries | code MiB | resident MiB after open | search median ms |",
        "|---|---|---|---|---|",
    ]
    for row in result["memory"]:
        lines.append(
            f"| {row['storage']} | {row['entries']:,} | {row['code_bytes'] / 2**20:.1f} | "
            f"{row['rss_mib']:.1f} | {row['search']['median_s'] * 1e3:.1f} |"
        )
    lines += [
        "",
        "Resident memory is read in the process that built the database, so the smallest sizes read "
        "low (the allocator reuses what building freed); at 10^5 entries it matches the codes.",
    ]
    lines += [
        "",
        "Not measured here: 10^7 entries (fp16 needs 29 GiB, more than this machine has), and the GPU "
        "paths (no GPU was available).",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    n_q = len(result["settings"]["queries"])
    stages = ("pool", "search", "fuse", "resize", "semantic", "panoptic")
    for ax, rows, x, label in (
        (axes[0], result["stages"][:n_q], lambda r: r["queries"], "query masks"),
        (axes[1], result["stages"][n_q:], lambda r: r["image"][0] * r["image"][1] / 1e6, "image Mpx"),
    ):
        for s in stages:
            ax.plot([x(r) for r in rows], [r[s]["median_s"] * 1e3 for r in rows], marker="o", label=s)
        ax.set_xlabel(label)
        ax.set_ylabel("median ms")
    axes[0].legend(fontsize=7)
    for storage in sorted({r["storage"] for r in result["memory"]}):
        rows = [r for r in result["memory"] if r["storage"] == storage]
        axes[2].loglog([r["entries"] for r in rows], [max(r["rss_mib"], 0.1) for r in rows], marker="o", label=storage)
    axes[2].set_xlabel("entries")
    axes[2].set_ylabel("resident MiB after open")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = [1000, 10000, 100000] + ([] if args.quick else [1000000])
    settings = {
        "entries": 100000,
        "queries": [50, 100, 150, 200, 250],
        "image": [512, 683],
        "sizes": [[256, 341], [512, 683], [768, 1024], [1024, 1365]],
        "repeats": args.repeats,
        "memory_sizes": sizes,
        "storages": ["fp32", "fp16", "sq8"],
    }
    stages = _spawn("stages", settings)["rows"]
    memory = [
        _spawn("memory", {"entries": n, "storage": s, "repeats": args.repeats})
        for s in settings["storages"]
        for n in sizes
    ]
    result = {
        "machine": machine(),
        "settings": settings,
        "stages": stages,
        "memory": memory,
        "command": "python benchmarks/scaling.py" + (" --quick" if args.quick else ""),
    }
    write_json("scaling", result)
    write_text("scaling.md", markdown(result))
    plot(result, RESULTS / "scaling.png")
    print(markdown(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        case = json.loads(sys.argv[2])
        worker = {"stages": stages_worker, "memory": memory_worker}[case.pop("kind")]
        print(json.dumps(worker(case)))
    else:
        main()
