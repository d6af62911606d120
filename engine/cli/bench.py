"""``knnclip bench``: the engine against the PyTorch eager reference, per stage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NO_DEVICE = 3  # --device cuda where no model backend can run on a GPU (as benchmarks/gpu_check.py)


def _bench(args: argparse.Namespace) -> int:
    from knnclip.engine.bench.end_to_end import run_bench
    from knnclip.engine.errors import BackendUnavailableError, UsageError

    preset = "full" if args.full else "quick" if args.quick else args.preset
    say = (lambda _: None) if args.json else print
    from knnclip.engine.cli.progress import heartbeat

    out = Path(args.out) if args.out else Path(args.work) / "results"
    if args.dry_run and args.device != "cuda":
        raise UsageError("--dry-run runs the device pipeline's code on the CPU: use it with --device cuda")
    try:
        with heartbeat("knnclip bench", quiet=args.json):  # each pipeline runs for minutes in its own process
            report = run_bench(
                preset,
                Path(args.work),
                out,
                args.name,
                say=say,
                fusion=args.fusion,
                device=args.device,
                dry_run=args.dry_run,
                index=args.index,
            )
    except BackendUnavailableError as exc:
        if args.device != "cuda":
            raise
        print(f"knnclip bench: {exc}")
        return NO_DEVICE
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
        "--fusion",
        default="out_of_vocab",
        choices=["out_of_vocab", "final"],
        help="where both pipelines fuse retrieval (default: the paper's, into the out-of-vocabulary branch)",
    )
    bench.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the pipelines run (auto: a GPU where a model backend can use one); --device cuda exits 3 "
        "where none can",
    )
    bench.add_argument(
        "--dry-run",
        action="store_true",
        help="with --device cuda: run the device pipeline's code on the CPU, torch tensors standing in for the "
        "GPU's arrays (what CI checks; its numbers mean nothing)",
    )
    from knnclip.engine.database.kinds import INDEX_KINDS

    bench.add_argument(
        "--index",
        default="flat",
        choices=INDEX_KINDS,
        help="the database's index kind (flat: exact; ivf-rabitq: the compressed index for 10^6 entries and more, "
        "trained on 50,000 of the entries)",
    )
    bench.add_argument("--work", default="knnclip-bench", help="working directory for models and the database")
    bench.add_argument(
        "--out",
        help="where the JSON, Markdown and PNG go (default WORK/results; the committed ones are "
        "benchmarks/results, written only when named)",
    )
    bench.add_argument("--name", help="results file stem (default end_to_end-PRESET-MACHINE)")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.set_defaults(run=_bench)
