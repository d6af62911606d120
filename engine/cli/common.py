"""What the CLI's command groups share: progress bars, retrieval settings from the command line,
opening a segmenter or a dataset split, and the options that go with them."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported for its type only: the segmenter imports much of the engine
    from knnclip.engine.pipeline.segmenter import Segmenter

Progress = Callable[[int, int], None]


def progress_items(items: list, label: str, quiet: bool) -> Iterable:
    """The items, with a tqdm bar on a terminal or a progress line every few seconds without one."""
    from knnclip.engine.cli.progress import progress_items as report

    return report(items, label, quiet)


def progress_factory(quiet: bool) -> Callable[[str], Progress | None]:
    """Makes (done, total) callbacks: tqdm bars on a terminal, progress lines without one."""
    from knnclip.engine.cli.progress import progress_callback

    return lambda label: progress_callback(label, quiet)


def retrieval_config(args: argparse.Namespace) -> Any:
    """``--config`` (or the defaults) with ``--k``/``--tau``/``--T``/``--lam`` on top."""
    from knnclip.engine.config import RetrievalConfig

    base = RetrievalConfig.from_file(args.config) if getattr(args, "config", None) else RetrievalConfig()
    return base.replace(**{k: v for k in ("k", "tau", "T", "lam") if (v := getattr(args, k, None)) is not None})


def open_segmenter(args: argparse.Namespace, read_only: bool) -> Segmenter:
    """The segmenter of ``--models`` and ``--db`` (created when missing unless ``read_only``)."""
    from knnclip.engine.pipeline.segmenter import Segmenter

    return Segmenter.from_dir(
        args.models,
        args.db,
        backend=args.backend,
        device=args.device,
        config=retrieval_config(args),
        read_only=read_only,
        search=getattr(args, "search", "fp32"),
    )


def segmenter_over(args: argparse.Namespace, db: Any, *, index: str = "flat", storage: str | None = None) -> Any:
    """A segmenter over ``db``: a Database, or a path (opened, or created with ``index``/``storage``)."""
    from knnclip.engine.database import Database
    from knnclip.engine.pipeline.models import ModelSet
    from knnclip.engine.pipeline.segmenter import Segmenter

    models = ModelSet(args.models, args.backend, args.device)
    try:
        if not isinstance(db, Database):
            path = Path(db)
            db = (
                Database.open(path)
                if path.exists()
                else Database.create(path, models.embedding_dim, index=index, storage=storage)
            )
            return Segmenter(models, db, retrieval_config(args), owns_database=True)
        return Segmenter(models, db, retrieval_config(args))
    except BaseException:
        models.close()
        raise


def dataset_split(args: argparse.Namespace, split: str, limit: int | None = None) -> Any:
    """``--dataset`` at ``--root``, one split, the first ``limit`` images when given."""
    from knnclip.engine.eval.datasets import open_dataset

    ds = open_dataset(args.dataset, args.root, split, args.classes)
    if limit is not None and limit < len(ds):
        ds = ds.subset(range(limit))
    return ds


def backend_options(p: argparse.ArgumentParser, *, models_required: bool = True) -> None:
    p.add_argument("--models", required=models_required, help="models directory (fcclip/image, fcclip/text, dinov2)")
    from knnclip.engine.backends import BACKENDS

    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def search_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--search",
        default="fp32",
        choices=["fp32", "bf16"],
        help="the database search: bf16 searches a flat database in bfloat16 on the CPU (OpenVINO; "
        "AVX-512 BF16 or AMX), 3x faster in knnclip bench --quick, the nearest class nearly always the same",
    )


def dataset_options(p: argparse.ArgumentParser) -> None:
    """The dataset and the models a dataset command runs on."""
    from knnclip.engine.eval.datasets import DATASETS

    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", help="the datasets folder (DETECTRON2_DATASETS) or the dataset's own (not for synthetic)")
    p.add_argument("--classes", help="class-name file (default: the FC-CLIP file found beside the data)")
    backend_options(p)
