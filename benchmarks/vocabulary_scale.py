"""The vocabulary at scale: compressed indexes at 10^5-10^7 entries of synthetic DINOv2-like
mask embeddings, against exact fp32 search.

    python benchmarks/vocabulary_scale.py --n 1000000            # 10^6: every kind, and the sweep
    python benchmarks/vocabulary_scale.py --n 10000000 --kinds rabitq-sq8-disk --sweep-nprobe 8,16 \\
        --checkpoint-mib 4096                                    # 10^7, run once
    python benchmarks/vocabulary_scale.py --n 100000 --name vocabulary-scale-quick   # CI's slow step

Writes benchmarks/results/<name>.{json,md}. The data come from
:class:`knnclip.engine.bench.embeddings.EmbeddingGenerator` (2,000 Zipf-sized classes of a few
sub-centres, a decaying spectrum; its measured statistics are in the results), generated chunk by
chunk: the exact fp32 top 10 of the 250 queries is computed on the same stream, so nothing of
size n x 1536 fp32 is ever held.

Each kind reports resident and disk bytes per entry, train and add time (every ivf-rabitq add
goes through ``Database.add``, durable through the log, checkpoints included), p50/p99 latency
of one search of 250 queries at k=10, recall@10 against exact fp32, and how often the top class
of P_ret (tau 0.05 over the 10 neighbours) equals exact fp32's. The baselines (exact fp16 scan,
ivf-pq) are FAISS indexes built in memory from the same chunks; the exact fp16 scan is searched
the way a flat fp16 ``Database`` searches (``database/flat_scan.py``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from common import machine, write_json, write_text

from knnclip.engine import Database
from knnclip.engine.bench.embeddings import EmbeddingGenerator
from knnclip.engine.bench.reference_ops import retrieval_probs
from knnclip.engine.database import flat_scan

DIM = 1536
QUERIES = 250  # one search call, as one image's masks
AGREEMENT_QUERIES = 1000  # recall and agreement are measured over this many (4 calls' worth)
K = 10
TAU = 0.05
TRAIN = 50_000
ADD_BATCH = 10_000
QUERY_STREAM, TRAIN_STREAM = 3, 2

# The new kind's variants: (store precision, store place, extra index params).
RABITQ = {
    "rabitq-sq8-ram": ("sq8", "ram", {}),
    "rabitq-fp16-ram": ("fp16", "ram", {}),
    "rabitq-sq8-disk": ("sq8", "disk", {}),
    "rabitq-pca512-sq8-ram": ("sq8", "ram", {"pca": 512}),
}
BASELINES = ("flat-fp16", "ivf-pq-m192")


@dataclass
class Built:
    name: str
    search: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]  # (queries, **knobs) -> (sims, labels, ids)
    train_s: float
    add_s: float
    bytes: dict[str, Any]
    db: Database | None = None


def agreement(labels: np.ndarray, sims: np.ndarray, exact_labels: np.ndarray, exact_sims: np.ndarray) -> float:
    """Share of queries whose P_ret top class equals exact search's."""
    classes = int(max(labels.max(), exact_labels.max())) + 1
    mine = retrieval_probs(sims, labels, classes, TAU).argmax(axis=1)
    exact = retrieval_probs(exact_sims, exact_labels, classes, TAU).argmax(axis=1)
    return float((mine == exact).mean())


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(found, exact, strict=True)]))


def latency_ms(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    fn()  # warm-up: page-in, thread pools
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)), "repeats": repeats}


class Baseline:
    """A FAISS index built in memory from the same chunks (positions are entry ids)."""

    def __init__(self, name: str, train: np.ndarray) -> None:
        self.name = name
        start = time.perf_counter()
        if name == "flat-fp16":
            self.index = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            self.index = faiss.IndexIVFPQ(faiss.IndexFlatIP(DIM), DIM, 1024, 192, 8, faiss.METRIC_INNER_PRODUCT)
            self.index.nprobe = 16
        self.index.train(train)
        self.train_s = time.perf_counter() - start
        self.add_s = 0.0
        self.labels: list[np.ndarray] = []

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        start = time.perf_counter()
        self.index.add(x)
        self.add_s += time.perf_counter() - start
        self.labels.append(y)

    def built(self) -> Built:
        labels = np.concatenate(self.labels)

        def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            if self.name == "flat-fp16":  # knnclip's own exact fp16 scan (BLAS over decoded blocks)
                sims, pos = flat_scan.scan(self.index, "fp16", q, K)
            else:
                sims, pos = self.index.search(q, K)
            return sims, np.where(pos >= 0, labels[np.maximum(pos, 0)], -1), pos

        codes = faiss.serialize_index(self.index).nbytes
        n = self.index.ntotal
        sizes = {"resident_b_per_entry": (codes + labels.nbytes) / n, "disk_b_per_entry": codes / n}
        return Built(self.name, search, self.train_s, self.add_s, sizes)


def build(args: argparse.Namespace, gen: EmbeddingGenerator, workdir: Path) -> tuple[list[Built], dict[str, Any]]:
    """One pass over the database stream: exact top-K, every kind's adds."""
    queries, _ = gen.sample(AGREEMENT_QUERIES, QUERY_STREAM)
    train, _ = gen.sample(TRAIN, TRAIN_STREAM)
    dbs: dict[str, Database] = {}
    train_s: dict[str, float] = {}
    for name in args.kinds:
        if name not in RABITQ:
            continue
        storage, place, extra = RABITQ[name]
        db = Database.create(
            workdir / name, DIM, index="ivf-rabitq", storage=storage, index_params={"store": place, **extra}
        )
        db.auto_checkpoint_bytes = args.checkpoint_mib << 20
        for c in range(gen.classes):
            db.add_class(f"class{c}")
        start = time.perf_counter()
        db.train(train)
        train_s[name] = time.perf_counter() - start
        dbs[name] = db
    baselines = [Baseline(name, train) for name in args.kinds if name in BASELINES]
    add_s = dict.fromkeys(dbs, 0.0)
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_p = np.full((len(queries), K), -1, np.int64)
    best_y = np.full((len(queries), K), -1, np.int64)
    generate_s = exact_s = 0.0
    began = t0 = time.perf_counter()
    for start, x, y in gen.database(args.n):
        generate_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        s = queries @ x.T  # exact fp32, merged into the running top K
        top = np.argpartition(-s, K, axis=1)[:, :K]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_p = np.concatenate([best_p, top + start], axis=1)
        cand_y = np.concatenate([best_y, y[top]], axis=1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :K]
        best_s, best_p, best_y = (np.take_along_axis(a, keep, 1) for a in (cand_s, cand_p, cand_y))
        exact_s += time.perf_counter() - t1
        for name, db in dbs.items():
            t2 = time.perf_counter()
            for lo in range(0, len(x), ADD_BATCH):
                db.add(x[lo : lo + ADD_BATCH], y[lo : lo + ADD_BATCH])
            add_s[name] += time.perf_counter() - t2
        for b in baselines:
            b.add(x, y)
        if start // gen.chunk % 16 == 15:
            print(f"  {start + len(x):,} entries ({time.perf_counter() - began:.0f} s)", flush=True)
        t0 = time.perf_counter()
    built = []
    for name, db in dbs.items():
        t2 = time.perf_counter()
        db.checkpoint()  # the disk store's last rows go to disk (what a restarted replica would see)
        add_s[name] += time.perf_counter() - t2
        st = db.stats()
        n = st["entries"]

        def search(q: np.ndarray, db: Database = db, **knobs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return db.search(q, K, **knobs)

        sizes = {
            "resident_b_per_entry": st["resident_bytes_per_entry"],
            "resident_parts_b_per_entry": {k: v / n for k, v in st["resident_parts"].items()},
            "disk_b_per_entry": st["disk_bytes_per_entry"],
            "params": st["params"],
        }
        built.append(Built(name, search, train_s[name], add_s[name], sizes, db))
    built += [b.built() for b in baselines]
    exact = {
        "queries": queries,
        "sims": best_s,
        "positions": best_p,
        "labels": best_y,
        "generate_s": generate_s,
        "exact_s": exact_s,
    }
    return built, exact


def measure(b: Built, exact: dict[str, Any], repeats: int, **knobs: Any) -> dict[str, Any]:
    q = exact["queries"]
    sims, labels, found = b.search(q, **knobs)
    return {
        **latency_ms(lambda: b.search(q[:QUERIES], **knobs), repeats),
        "recall_at_10": recall(found, exact["positions"]),
        "p_ret_top1_agreement": agreement(labels, sims, exact["labels"], exact["sims"]),
    }


def sweep(
    b: Built, exact: dict[str, Any], nprobes: list[int], reranks: list[int], repeats: int
) -> list[dict[str, Any]]:
    rows = []
    for nprobe in nprobes:
        for rerank in reranks:
            row = {"nprobe": nprobe, "rerank": rerank, **measure(b, exact, repeats, nprobe=nprobe, rerank=rerank)}
            print(f"    {b.name} nprobe {nprobe} rerank {rerank}: {row}", flush=True)
            rows.append(row)
    return rows


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both latency and agreement."""
    return [
        r
        for r in rows
        if not any(
            o["p50_ms"] <= r["p50_ms"]
            and o["p_ret_top1_agreement"] >= r["p_ret_top1_agreement"]
            and (o["p50_ms"], o["p_ret_top1_agreement"]) != (r["p50_ms"], r["p_ret_top1_agreement"])
            for o in rows
        )
    ]


def markdown(result: dict[str, Any]) -> str:
    n = result["n"]
    lines = [
        f"# The vocabulary at scale: {n:,} entries",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; faiss {faiss.__version__}. "
        f"Produced by `{result['command']}`.",
        f"Search: one call of {QUERIES} queries, k={K}, {DIM}-d, faiss on {faiss.omp_get_max_threads()} threads. "
        f"Exact: fp32 brute force over the same stream. Recall and P_ret agreement (tau {TAU} over the {K} "
        f"neighbours) over {AGREEMENT_QUERIES} queries.",
        "",
        "## Each kind at its defaults",
        "",
        "| kind | params | resident B/entry | disk B/entry | train s | add s | add entries/s "
        "| p50 ms | p99 ms | recall@10 | P_ret top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["kinds"]:
        params = r["bytes"].get("params", "")
        params = ", ".join(f"{k}={v}" for k, v in params.items() if v is not None) if params else "-"
        sizes = r["bytes"]
        lines.append(
            f"| {r['name']} | {params} | {sizes['resident_b_per_entry']:.0f} | {sizes['disk_b_per_entry']:.0f} "
            f"| {r['train_s']:.1f} | {r['add_s']:.0f} | {n / max(r['add_s'], 1e-9):,.0f} | {r['p50_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['recall_at_10']:.3f} | {r['p_ret_top1_agreement']:.3f} |"
        )
    lines += [
        "",
        "Resident: what the process holds for the database (index codes, ids and centroids; entry ids, "
        "classes and provenance; the re-rank store where it is in RAM). A store on disk is memory-mapped: "
        "its rows are page cache, read only for the candidates. Disk: checkpoint files after a final "
        "checkpoint. The baselines' add is FAISS's alone (no log).",
        "",
    ]
    for name, rows in result["sweeps"].items():
        lines += [
            f"## Sweep: {name}",
            "",
            "| nprobe | rerank | p50 ms | p99 ms | recall@10 | P_ret top-1 agreement | on the Pareto front |",
            "|---|---|---|---|---|---|---|",
        ]
        front = {(r["nprobe"], r["rerank"]) for r in pareto(rows)}
        for r in rows:
            lines.append(
                f"| {r['nprobe']} | {r['rerank']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['recall_at_10']:.3f} "
                f"| {r['p_ret_top1_agreement']:.3f} | {'yes' if (r['nprobe'], r['rerank']) in front else ''} |"
            )
        lines.append("")
    s = result["generator"]["statistics"]
    lines += [
        "## The data",
        "",
        f"`EmbeddingGenerator({result['generator']['params']})`, measured on 20,000 samples: within-class "
        f"cosine mean {s['within_cos_mean']:.2f} (p10 {s['within_cos_p10']:.2f}, p90 {s['within_cos_p90']:.2f}); "
        f"between-class mean {s['between_cos_mean']:.2f} (p10 {s['between_cos_p10']:.2f}, p90 "
        f"{s['between_cos_p90']:.2f}); the top 10 principal directions hold {s['variance_top10']:.0%} of the "
        f"variance, the top 100 {s['variance_top100']:.0%}; the largest class is {s['largest_class_share']:.1%} "
        f"of the entries, the smallest {s['smallest_class_share']:.4%}. Generating the stream took "
        f"{result['exact']['generate_s']:.0f} s and the exact top 10 {result['exact']['exact_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="database entries")
    parser.add_argument("--kinds", default=",".join([*RABITQ, *BASELINES]), help="comma-separated kinds to build")
    parser.add_argument("--sweep-nprobe", default="8,16,32", help="nprobe values of the sweep (ivf-rabitq kinds)")
    parser.add_argument("--sweep-rerank", default="0,50,100,200", help="re-rank depths of the sweep")
    parser.add_argument("--repeats", type=int, default=11, help="timed searches per measurement")
    parser.add_argument("--checkpoint-mib", type=int, default=256, help="the databases' auto_checkpoint_bytes")
    parser.add_argument("--workdir", default=None, help="where the databases are built (default: a temp dir)")
    parser.add_argument("--name", default=None, help="results file stem (default: vocabulary-scale-<n>)")
    parser.add_argument("--results", default=None, help="results directory (default: benchmarks/results)")
    args = parser.parse_args()
    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(args.kinds) - set(RABITQ) - set(BASELINES)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {[*RABITQ, *BASELINES]}")
    faiss.omp_set_num_threads(2)
    gen = EmbeddingGenerator(seed=0)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="knnclip-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        built, exact = build(args, gen, workdir)
        kinds, sweeps = [], {}
        for b in built:
            row = {"name": b.name, "train_s": b.train_s, "add_s": b.add_s, "bytes": b.bytes}
            row.update(measure(b, exact, args.repeats if not b.name.startswith("flat") else 3))
            print(f"  {b.name}: {row}", flush=True)
            kinds.append(row)
            if b.db is not None:
                nprobes = [int(v) for v in args.sweep_nprobe.split(",") if v]
                reranks = [int(v) for v in args.sweep_rerank.split(",") if v]
                sweeps[b.name] = sweep(b, exact, nprobes, reranks, args.repeats)
        for b in built:
            if b.db is not None:
                b.db.close(checkpoint=False)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    command = "python benchmarks/vocabulary_scale.py " + " ".join(
        f"--{k.replace('_', '-')} {','.join(v) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v is not None and k not in ("workdir", "results")
    )
    result = {
        "n": args.n,
        "command": command,
        "machine": machine(),
        "kinds": kinds,
        "sweeps": sweeps,
        "exact": {k: v for k, v in exact.items() if k.endswith("_s")},
        "generator": {"params": f"seed={gen.seed}", "statistics": gen.statistics()},
    }
    name = args.name or f"vocabulary-scale-{args.n}"
    directory = Path(args.results) if args.results else None
    extra = {"directory": directory} if directory else {}
    write_json(name, result, **extra)
    print(write_text(f"{name}.md", markdown(result), **extra))


if __name__ == "__main__":
    main()
