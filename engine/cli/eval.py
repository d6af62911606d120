"""``knnclip eval semantic|panoptic|instance|continual|sweep``.

Each ``eval`` command writes ``NAME.json``, ``NAME.md`` and ``NAME.png`` under ``--out`` and
prints the Markdown table (or the JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from knnclip.engine.cli.common import dataset_options, dataset_split, progress_factory, segmenter_over
from knnclip.engine.errors import InvalidInputError, UsageError


def _finish(args: argparse.Namespace, report: dict[str, Any], name: str) -> int:
    from knnclip.engine.eval.report import markdown, write_report

    report["command"] = "knnclip " + " ".join(sys.argv[1:])
    paths = write_report(report, args.out, args.name or name)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(markdown(report))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database
    from knnclip.engine.eval.datasets.readers import PANOPTIC
    from knnclip.engine.eval.evaluate import class_lut, evaluate, register_classes, semantic_summary

    panoptic = args.eval_command == "panoptic"
    if args.eval_command in ("panoptic", "instance") and args.dataset not in PANOPTIC:
        raise UsageError(f"{args.eval_command} evaluation needs a panoptic dataset ({', '.join(PANOPTIC)})")
    ds = dataset_split(args, args.split, args.limit)
    with tempfile.TemporaryDirectory(prefix="knnclip-eval-") as scratch:
        # Without --db, FC-CLIP alone: a throw-away database that holds the class names only.
        db: Any = Path(scratch) / "db" if args.db is None else Database.open(args.db, read_only=not args.register)
        try:
            with segmenter_over(args, db) as seg:
                if args.db is None or args.register:
                    register_classes(seg, ds.classes)
                known = set(class_lut(seg, ds.classes).tolist())
                missing = [c.name for i, c in enumerate(ds.classes) if i not in known]
                if missing:
                    raise InvalidInputError(
                        f"{args.db}: {len(missing)} of the dataset's classes are not in the database's vocabulary "
                        f"(e.g. {missing[:3]}); add them with knnclip db add-dataset, or pass --register"
                    )
                progress = progress_factory(args.json)("eval")
                if args.eval_command == "instance":
                    from knnclip.engine.eval.instance import evaluate_instances

                    result = evaluate_instances(seg, ds, progress)
                else:
                    result = semantic_summary(evaluate(seg, ds, panoptic=panoptic, progress=progress), ds.classes)
                report = {
                    "protocol": args.eval_command,
                    "dataset": {"key": ds.key, "split": ds.split, "images": len(ds), "classes": len(ds.classes)},
                    "database": {"path": args.db, "entries": len(seg.db)},
                    "retrieval": seg.config.to_json(),
                    "backends": dict(seg.models.backends),
                    "result": result,
                }
        finally:
            if isinstance(db, Database):
                db.close()
    return _finish(args, report, f"{args.eval_command}-{ds.key}-{ds.split}")


def _continual(args: argparse.Namespace) -> int:
    from knnclip.engine.eval.continual import ContinualSettings, run_continual

    train = dataset_split(args, "train", args.train_limit)
    val = dataset_split(args, "val", args.val_limit)
    with tempfile.TemporaryDirectory(prefix="knnclip-continual-db-") as work:
        with segmenter_over(args, Path(work) / "db", index=args.index, storage=args.storage) as seg:
            settings = ContinualSettings(args.steps, args.shuffle, args.seed, not args.no_forgetting)
            report = run_continual(
                seg,
                train,
                val,
                settings,
                say=(lambda _: None) if args.json else print,
                progress=progress_factory(args.json),
            )
    return _finish(args, report, f"continual-{train.key}-{args.steps}steps")


def _sweep(args: argparse.Namespace) -> int:
    from knnclip.engine.eval.sweep import SweepGrid, run_sweep

    train = dataset_split(args, "train", args.train_limit)
    grid = SweepGrid(
        tuple(args.k_values),
        tuple(args.tau_values),
        tuple(args.T_values),
        tuple(args.lam_values),
        tuple(args.fusion_values),
    )
    with tempfile.TemporaryDirectory(prefix="knnclip-sweep-") as work, segmenter_over(args, Path(work) / "db") as seg:
        report = run_sweep(
            seg, train, grid, held_out=args.held_out, seed=args.seed, progress=progress_factory(args.json)
        )
    if args.write_config:
        from knnclip.engine.config import RetrievalConfig

        RetrievalConfig(**report["best"]["config"]).to_file(args.write_config, source=report["source"])
    return _finish(args, report, f"sweep-{train.key}")


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="knnclip-eval", help="where the JSON, Markdown and PNG go")
    p.add_argument("--name", help="report file stem")
    p.add_argument("--config", help="retrieval settings JSON (e.g. written by knnclip eval sweep --write-config)")
    for name, kind in (("k", int), ("tau", float), ("T", float), ("lam", float)):
        p.add_argument(f"--{name}", type=kind, help="override the retrieval setting")


def add_parser(commands: argparse._SubParsersAction) -> None:
    from knnclip.engine.database.indexes import INDEX_KINDS, STORAGES

    ev = commands.add_parser("eval", help="measure mIoU / PQ on a dataset, the continual protocol, sweeps")
    sub = ev.add_subparsers(dest="eval_command", metavar="PROTOCOL", required=True)
    for kind, text in (
        ("semantic", "mIoU and pixel accuracy"),
        ("panoptic", "PQ, SQ, RQ (and mIoU)"),
        ("instance", "mask AP of the instance inference (pycocotools' COCOeval)"),
    ):
        p = sub.add_parser(kind, help=f"{text} on a dataset split")
        dataset_options(p)
        _report_options(p)
        p.add_argument("--db", help="database to use (default: none, FC-CLIP alone with the dataset's classes)")
        p.add_argument("--register", action="store_true", help="add the dataset's classes the database lacks")
        p.add_argument("--split", default="val", choices=["train", "val"])
        p.add_argument("--limit", type=int, help="evaluate the first N images only")
        p.set_defaults(run=_evaluate)

    p = sub.add_parser("continual", help="classes join in T steps; mIoU per step, old/new, forgetting")
    dataset_options(p)
    _report_options(p)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--shuffle", action="store_true", help="random class order (with --seed) instead of the dataset's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-forgetting", action="store_true", help="skip the forgetting re-evaluation")
    p.add_argument("--index", choices=INDEX_KINDS, default="flat")
    p.add_argument("--storage", choices=STORAGES, default=None)
    p.add_argument("--train-limit", type=int, help="use the first N training images")
    p.add_argument("--val-limit", type=int, help="use the first N validation images")
    p.set_defaults(run=_continual)

    p = sub.add_parser("sweep", help="grid over k, tau, T, lambda on a held-out part of the training split")
    dataset_options(p)
    _report_options(p)
    p.add_argument("--k-values", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--tau-values", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    p.add_argument("--T-values", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--lam-values", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--fusion-values", nargs="+", default=["out_of_vocab", "final"], choices=["out_of_vocab", "final"])
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of the training images held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, help="use the first N training images")
    p.add_argument("--write-config", help="write the best settings as a retrieval config JSON")
    p.set_defaults(run=_sweep)
