"""The cost of searching a database split into shards: one search of 250 queries (k=10) over
the unsharded database against the same entries in 3 shards, searched by 3 threads in this
process and by 3 Ray actors on a local instance (the top k merged exactly either way).

    python benchmarks/shards.py [--n 100000] [--shards 3]

On a 2-core machine the shards cannot search faster than one database (there is no core to
spare), so what this measures is the fan-out's overhead: shipping the queries to each worker,
the workers' own scheduling, and the merge. Writes ``results/shards.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import machine, write_json, write_text

from knnclip.engine import Database
from knnclip.engine.bench.embeddings import EmbeddingGenerator
from knnclip.engine.database.shards import ShardedDatabase, split_database

QUERIES, K = 250, 10


def timed(fn: Any, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--storage", default="fp16")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray instance on loopback
    gen = EmbeddingGenerator(seed=0)
    queries = gen.sample(QUERIES, 3)[0]
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="knnclip-shards-") as work_dir:
        work = Path(work_dir)
        with Database.create(work / "db", gen.dim, storage=args.storage) as db:
            db.auto_checkpoint_bytes = 1 << 40
            for c in range(gen.classes):
                db.add_class(f"class{c}")
            for _, x, y in gen.database(args.n):
                db.add(x, y)
        split_database(work / "db", work / "sharded", args.shards)
        with Database.open(work / "db", read_only=True) as db:
            reference = db.search(queries, K)
            rows["unsharded"] = {"ms": timed(lambda: db.search(queries, K), args.repeats)}
        # interleaved rounds would be fairer, but Ray and the threads cannot share the cores
        with ShardedDatabase(work / "sharded") as sharded:
            assert np.array_equal(sharded.search(queries, K).ids, reference.ids)
            rows[f"{args.shards} shards, threads"] = {"ms": timed(lambda: sharded.search(queries, K), args.repeats)}
        try:
            import ray
        except ImportError:
            print("ray is not installed: the Ray row is skipped")
        else:
            ray.init(num_cpus=max(2, args.shards), include_dashboard=False, configure_logging=False)
            try:
                with ShardedDatabase(work / "sharded", workers="ray", cpus_per_shard=1) as sharded:
                    assert np.array_equal(sharded.search(queries, K).ids, reference.ids)
                    rows[f"{args.shards} shards, Ray actors"] = {
                        "ms": timed(lambda: sharded.search(queries, K), args.repeats)
                    }
            finally:
                ray.shutdown()
    base = float(np.median(rows["unsharded"]["ms"]))
    for row in rows.values():
        row["p50_ms"] = float(np.median(row["ms"]))
        row["p99_ms"] = float(np.percentile(row["ms"], 99))
        row["overhead_ms"] = row["p50_ms"] - base
    report = {"machine": machine(), "n": args.n, "shards": args.shards, "storage": args.storage, "rows": rows}
    write_json("shards", report)
    m = report["machine"]
    lines = [
        f"# Sharded search ({m['cpu']}, {m['cores']} cores): `python benchmarks/shards.py --n {args.n}`",
        "",
        f"{args.n:,} synthetic DINOv2-like entries (flat {args.storage}, 1536-d); one search of {QUERIES} queries "
        f"at k={K}; the sharded answers equal the unsharded ones (checked). Median of {args.repeats}.",
        "",
        "| search | p50 ms | p99 ms | fan-out overhead ms (p50 - unsharded p50) |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['overhead_ms']:+.1f} |")
    lines += [
        "",
        "On 2 cores the shards share the cores one database would use, so neither row is the speed-up "
        "shards give on a machine (or a core) each. Ray starts each actor with one CPU's worth of BLAS and "
        "OpenMP threads, so 3 actors run 3 single-threaded scans, which here beat one scan over 2 threads. "
        "Threads in one process each run a BLAS scan over every core: 3 at once oversubscribe the cores. "
        "Use workers='threads' where the cores outnumber the shards' threads, and Ray actors otherwise.",
        "",
    ]
    print(write_text("shards.md", "\n".join(lines)))


if __name__ == "__main__":
    main()
