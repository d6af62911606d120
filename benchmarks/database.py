"""Database benchmark: durable add throughput, search latency and bytes per entry against size,
recall of the approximate indexes against exact search, and top-1 agreement of fp16/sq8 with fp32.

    python benchmarks/database.py            # sizes 10^3 .. 10^6 (CPU), recall on 100k x 1536
    python benchmarks/database.py --quick    # sizes 10^3 .. 10^5

Writes benchmarks/results/database.{json,md,png}. Data: 1536-d vectors, either "clustered" (150
classes around random unit centres, like mask embeddings of ADE20K-150 classes) or "gaussian"
(i.i.d. normal, no structure: the hardest case for approximate search). Every add goes through
the write-ahead log with fsync, as in production.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from common import RESULTS, machine, pyplot, write_json, write_text

from knnclip.engine import Database

DIM = 1536
CLASSES = 150
QUERIES = 250
K = 10
ADD_BATCH = 1000


def clustered(n: int, seed: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centres), n)
    x = centres[labels] + 0.6 * rng.standard_normal((n, DIM), dtype=np.float32) / np.sqrt(DIM)
    return x.astype(np.float32), labels


def gaussian(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)


def new_database(path: Path, **kwargs: Any) -> Database:
    """A database with the benchmark's classes registered as ids 0..CLASSES-1."""
    db = Database.create(path, DIM, **kwargs)
    for c in range(CLASSES):
        db.add_class(f"class{c}")
    return db


def latency(fn: Any, repeats: int) -> dict[str, float]:
    fn()  # warm-up (page-in, BLAS threads)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    t = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)), "repeats": repeats}


def scaling(sizes: list[int], workdir: Path, centres: np.ndarray) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Grow one flat database per storage through ``sizes``; measure at each size."""
    rows = []
    queries, _ = clustered(1000, seed=1, centres=centres)
    top1: dict[str, np.ndarray] = {}
    for storage in ("fp32", "fp16", "sq8"):
        path = workdir / f"flat-{storage}"
        db = new_database(path, index="flat", storage=storage)
        if db.index_spec.needs_training:
            db.train(clustered(20_000, seed=2, centres=centres)[0])
        have = 0
        add_seconds = 0.0
        for size in sizes:
            while have < size:
                n = min(ADD_BATCH, size - have)
                x, labels = clustered(n, seed=100 + have, centres=centres)
                start = time.perf_counter()
                db.add(x, labels)
                add_seconds += time.perf_counter() - start
                have += n
            repeats = 20 if size <= 10_000 else (7 if size <= 100_000 else 3)
            lat = latency(lambda db=db: db.search(queries[:QUERIES], K), repeats)
            db.checkpoint()
            stats = db.stats()
            row = {
                "storage": storage,
                "entries": size,
                "add_entries_per_s": have / add_seconds,
                "search": lat,
                "code_bytes_per_entry": stats["code_bytes_per_entry"],
                "disk_bytes_per_entry": stats["disk_bytes_per_entry"],
            }
            if storage != "fp32" and size <= 100_000:
                # FAISS's own scan of the same codes, which Database.search replaces for flat fp16/sq8:
                # the index the checkpoint just wrote, read back through faiss (the manifest names it).
                manifest = json.loads((path / "manifest.json").read_text())
                index = faiss.read_index(str(path / manifest["files"]["index"]["name"]))
                row["faiss_scan"] = latency(lambda index=index: index.search(queries[:QUERIES], K), 3)
            rows.append(row)
            print(row, flush=True)
        top1[storage] = db.search(queries, 1).labels[:, 0]
        db.close()
        shutil.rmtree(path)
    agreement = {s: float(np.mean(top1[s] == top1["fp32"])) for s in ("fp16", "sq8")}
    agreement["queries"] = len(queries)
    agreement["entries"] = sizes[-1]
    return rows, agreement


def recall(n: int, workdir: Path, centres: np.ndarray) -> list[dict[str, Any]]:
    """recall@10 of each approximate index (default parameters) against exact fp32 search."""
    rows = []
    for dataset in ("clustered", "gaussian"):
        if dataset == "clustered":
            x, labels = clustered(n, seed=3, centres=centres)
            q, _ = clustered(QUERIES, seed=4, centres=centres)
        else:
            x, labels = gaussian(n, seed=3), np.random.default_rng(3).integers(0, CLASSES, n)
            q = gaussian(QUERIES, seed=4)
        exact = None
        for kind, storage in [("flat", "fp32"), ("ivf-flat", "fp16"), ("ivf-pq", None), ("hnsw", "fp16")]:
            path = workdir / f"{dataset}-{kind}"
            db = new_database(path, index=kind, storage=storage)
            db.auto_checkpoint_bytes = 1 << 40  # measure index building, not checkpoints
            start = time.perf_counter()
            if db.index_spec.needs_training:
                db.train(x[: min(n, 50_000)])
            train_s = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(0, n, 10_000):
                db.add(x[i : i + 10_000], labels[i : i + 10_000])
            add_s = time.perf_counter() - start
            _, _, ids = db.search(q, K)
            if exact is None:
                exact = ids
            r = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids.tolist(), exact.tolist(), strict=True)])
            lat = latency(lambda db=db, q=q: db.search(q, K), 5)
            db.close(checkpoint=True)
            stats = Database.open(path, read_only=True).stats()
            row = {
                "dataset": dataset,
                "index": kind,
                "storage": stats["storage"],
                "params": stats["params"],
                "entries": n,
                "recall_at_10": float(r),
                "train_s": train_s,
                "add_s": add_s,
                "search": lat,
                "disk_bytes_per_entry": stats["disk_bytes_per_entry"],
            }
            rows.append(row)
            print(row, flush=True)
            shutil.rmtree(path)
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# knnclip Database: add, search, memory, recall",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; faiss {m['versions']['faiss']}, "
        f"numpy {m['versions']['numpy']}. Produced by `{result['command']}`.",
        f"Search: {QUERIES} queries, k={K}, 1536-d. Adds: batches of {ADD_BATCH}, each fsynced through the "
        "write-ahead log (checkpoints included in the rate).",
        "",
        "## Flat (exact) index against size",
        "",
        "| storage | entries | add entries/s | search p50 ms | search p99 ms | FAISS scan p50 ms | code B/entry | "
        "disk B/entry |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["scaling"]:
        faiss_ms = f"{r['faiss_scan']['p50_ms']:.1f}" if "faiss_scan" in r else "-"
        lines.append(
            f"| {r['storage']} | {r['entries']:,} | {r['add_entries_per_s']:,.0f} | {r['search']['p50_ms']:.1f} | "
            f"{r['search']['p99_ms']:.1f} | {faiss_ms} | {r['code_bytes_per_entry']:.0f} | "
            f"{r['disk_bytes_per_entry']:.0f} |"
        )
    a = result["agreement"]
    lines += [
        "",
        "p99 over the number of repeats in the JSON (20 up to 10^4 entries, 7 at 10^5, 3 at 10^6). "
        "FAISS scan: FAISS's own IndexScalarQuantizer search over the same codes; Database.search decodes "
        "blocks and scores them with BLAS instead.",
        "",
        f"Top-1 label agreement with fp32 ({a['queries']} queries, {a['entries']:,} entries, clustered): "
        f"fp16 {a['fp16']:.4f}, sq8 {a['sq8']:.4f}.",
    ]
    if result.get("recall"):
        lines += [
            "",
            f"## Approximate indexes: recall@10 against exact search ({result['recall'][0]['entries']:,} x 1536)",
            "",
            "| data | index | storage | parameters | recall@10 | train s | add s | search p50 ms | disk B/entry |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["recall"]:
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
            lines.append(
                f"| {r['dataset']} | {r['index']} | {r['storage']} | {params} | {r['recall_at_10']:.3f} | "
                f"{r['train_s']:.1f} | {r['add_s']:.1f} | {r['search']['p50_ms']:.1f} | "
                f"{r['disk_bytes_per_entry']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for storage in ("fp32", "fp16", "sq8"):
        rows = [r for r in result["scaling"] if r["storage"] == storage]
        n = [r["entries"] for r in rows]
        ax1.plot(n, [r["search"]["p50_ms"] for r in rows], "o-", label=f"{storage} (knnclip)")
        faiss_rows = [r for r in rows if "faiss_scan" in r]
        if faiss_rows:
            ax1.plot(
                [r["entries"] for r in faiss_rows],
                [r["faiss_scan"]["p50_ms"] for r in faiss_rows],
                "x--",
                label=f"{storage} (FAISS scan)",
            )
        ax2.plot(n, [r["add_entries_per_s"] for r in rows], "o-", label=storage)
    ax1.set(xscale="log", yscale="log", xlabel="entries", ylabel=f"search p50 ms ({QUERIES} queries, k={K})")
    ax2.set(xscale="log", xlabel="entries", ylabel="durable add entries/s")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Flat database, 1536-d, {result['machine']['cpu']}, {result['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sizes up to 10^5 instead of 10^6")
    parser.add_argument("--recall-n", type=int, default=100_000, help="database size of the recall test (0: skip)")
    parser.add_argument("--sizes", default=None, help="comma-separated database sizes (overrides --quick)")
    parser.add_argument("--workdir", default=None, help="where the databases are built (default: a temp dir)")
    parser.add_argument("--name", default="database", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    sizes = [1_000, 10_000, 100_000] + ([] if args.quick else [1_000_000])
    if args.sizes:
        sizes = [int(v) for v in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLASSES, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    command = "python benchmarks/database.py" + (" --quick" if args.quick else "")
    if args.sizes:
        command += f" --sizes {args.sizes}"
    if args.recall_n != 100_000:
        command += f" --recall-n {args.recall_n}"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        rows, agreement = scaling(sizes, workdir, centres)
        result: dict[str, Any] = {"machine": machine(), "command": command, "scaling": rows, "agreement": agreement}
        result["recall"] = recall(args.recall_n, workdir, centres) if args.recall_n else []
    write_json(args.name, result)
    write_text(f"{args.name}.md", markdown(result))
    plot(result, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.{{json,md,png}}")


if __name__ == "__main__":
    main()
