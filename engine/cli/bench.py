"""``knnclip bench``: the engine against the PyTorch eager reference, per stage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    from knnclip.engine.bench.end_to_end import run_bench

    preset = "full" if args.full else "quick" if args.quick else args.preset
    say = (lambda _: None) if args.json else print
    from knnclip.engine.cli.progress import heartbeat

    out = Path(args.out) if args.out else Path(args.work) / "results"
    with heartbeat("knnclip bench", quiet=args.json):  # each pipeline runs for minutes in its own process
        report = run_bench(preset, Path(args.work), out, args.name, say=say, fusion=args.fusion)
    if args.json:
        print(json.dumps(report, indent=1))
    failed = [k for k, v in report["pipelines"].items() if "error" in v]
    return 1 if failed else 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="per-stage latency, throughput and memory, engine vs a PyTorch eager reference pipeline"
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced models on a CPU, under 5 minutes on 2 cores")
    size.add_argument("--full", action="store_true", help="the real model sizes, 10^6 entries: for a GPU")
    size.add_argument("--preset", default="quick", choices=["tiny", "quick", "full"])
    bench.add_argument(
        "--fusion", default="out_of_vocab", choices=["out_of_vocab", "final"],
        help="where both pipelines fuse retrieval (default: the paper's, into the out-of-vocabulary branch)",
    )  # fmt: skip
    bench.add_argument("--work", default="knnclip-bench", help="working directory for models and the database")
    bench.add_argument(
        "--out", help="where the JSON, Markdown and PNG go (default WORK/results; the committed ones are "
        "benchmarks/results, written only when named)"
    )  # fmt: skip
    bench.add_argument("--name", help="results file stem (default end_to_end-PRESET-MACHINE)")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.set_defaults(run=_bench)
