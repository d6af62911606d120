"""``knnclip db``: create, train, add to (embeddings or a dataset split), remove from, inspect, check and
snapshot a database."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.cli.common import dataset_options, dataset_split, progress_factory, segmenter_over
from knnclip.engine.errors import InvalidInputError, UsageError


def _params(pairs: list[str]) -> dict[str, int | str]:
    """``--param NAME=VALUE`` pairs: integers (nlist=1024) or words (store=disk)."""
    out: dict[str, int | str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"--param takes NAME=VALUE (e.g. nlist=1024 or store=disk), got {pair!r}")
        out[name] = int(value) if value.isdigit() else value
    return out


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInputError(f"{path}: not a readable .npy array ({exc})") from None


def embedding_files(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(embeddings.npy, labels) pairs: each .npy [N, D] with labels beside it in NAME.txt
    (one class name per line) or NAME.labels.npy (class ids); folders are searched for such pairs."""
    pairs = []
    for item in map(Path, inputs):
        files = sorted(p for p in item.glob("*.npy") if not p.name.endswith(".labels.npy")) if item.is_dir() else [item]
        if item.is_dir() and not files:
            raise InvalidInputError(f"{item}: no .npy embedding files in this folder")
        for f in files:
            if not f.is_file():
                raise InvalidInputError(f"{f}: no such file")
            candidates = [f.with_suffix(".txt"), f.with_name(f.stem + ".labels.npy")]
            labels = next((c for c in candidates if c.is_file()), None)
            if labels is None:
                raise InvalidInputError(f"{f}: no labels beside it ({candidates[0].name} or {candidates[1].name})")
            pairs.append((f, labels))
    return pairs


def _read_labels(path: Path) -> list[str] | np.ndarray:
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = _load_npy(path)
    if labels.dtype.kind not in "iu":
        raise InvalidInputError(f"{path}: class ids must be integers, got {labels.dtype}")
    return labels


def _print(args: argparse.Namespace, report: dict[str, Any], text: str) -> None:
    print(json.dumps(report, indent=2, default=str) if args.json else text)


def _create(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    storage = args.storage
    with Database.create(
        args.db, args.dim, metric=args.metric, index=args.index, storage=storage, index_params=_params(args.param)
    ) as db:
        stats = db.stats()
    _print(
        args, stats, f"created {args.db}: {stats['index']}/{stats['storage']}, dim {stats['dim']}, {stats['metric']}"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    with Database.open(args.db) as db:
        db.train(_load_npy(Path(args.samples)))
        stats = db.stats()
    _print(args, stats, f"trained {args.db}: {stats['params']}")
    return 0


def _add(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    pairs = embedding_files(args.inputs)
    added = 0
    with Database.open(args.db) as db:
        for name in args.thing or ():
            db.add_class(name, thing=True)
        for embeddings, labels in pairs:
            added += len(db.add(_load_npy(embeddings), _read_labels(labels)))
        classes = db.classes
    _print(
        args,
        {"added": added, "files": len(pairs), "classes": classes},
        f"added {added} entries from {len(pairs)} files; {len(classes)} classes",
    )
    return 0


def _remove(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    removed = {}
    with Database.open(args.db) as db:
        for name in args.classes:
            removed[name] = db.remove_class(name)
    _print(args, {"removed": removed}, "\n".join(f"removed {name}: {n} entries" for name, n in removed.items()))
    return 0


def _remove_entries(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    with Database.open(args.db) as db:
        removed = db.remove_entries(args.ids)
        report = {"removed": removed, "entries": len(db)}
    _print(args, report, f"removed {removed} entries ({report['entries']} left)")
    return 0


def _entries(args: argparse.Namespace) -> int:
    import dataclasses

    from knnclip.engine.database import Database

    with Database.open(args.db, read_only=True) as db:
        records = db.entries(args.class_name, args.source, offset=args.offset, limit=args.limit)
    rows = [dataclasses.asdict(r) for r in records]
    text = "\n".join(
        f"{r.id}\t{r.class_name}\t{r.source if r.source is not None else '-'}\t{r.mask if r.mask is not None else '-'}"
        for r in records
    )
    _print(args, {"entries": rows}, text or "no entries")
    return 0


def _remove_source(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    with Database.open(args.db) as db:
        removed = db.remove_source(args.source)
        report = {"source": args.source, "removed": removed, "entries": len(db)}
    _print(args, report, f"removed {removed} entries added from {args.source!r} ({report['entries']} left)")
    return 0


def _rename(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    with Database.open(args.db) as db:
        info = db.rename_class(args.old, args.new)
    _print(args, info.to_json(), f"class {info.id} is now {info.name!r}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    with Database.open(args.db) as db:
        entries = db.classes.get(args.source)
        info = db.merge_classes(args.source, args.target)
        report = {"merged": args.source, "into": info.to_json(), "entries_moved": entries}
    _print(args, report, f"merged {args.source!r} ({entries} entries) into {info.name!r}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    with Database.open(args.db, read_only=True) as db:
        stats, classes = db.stats(), db.classes
    stats["class_counts"] = classes
    width = max(map(len, stats), default=0)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in stats.items() if k != "class_counts")
    _print(args, stats, text + "\n" + "\n".join(f"  {name}: {n}" for name, n in classes.items()))
    return 0


def _check(args: argparse.Namespace) -> int:
    """Open read-only: every file's size and SHA-256, the manifest's checksum, every log record's CRC."""
    from knnclip.engine.database import Database

    with Database.open(args.db, read_only=True) as db:
        stats = db.stats()
    text = (
        f"ok: {args.db}: {stats['entries']} entries, {stats['classes']} classes, "
        f"log at {stats['lsn']} (checkpoint {stats['checkpoint_lsn']})"
    )
    if stats["log_torn_bytes"]:
        text += (
            f"\nlog: a torn record of {stats['log_torn_bytes']} bytes at byte {stats['log_bytes']} (a write that a "
            "crash cut short, never acknowledged); the next writer open keeps it aside as wal.log.torn-* and cuts it"
        )
    _print(args, {"ok": True, **stats}, text)
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    with Database.open(args.db, read_only=True) as db:
        db.snapshot(args.out)
    _print(args, {"snapshot": args.out}, f"wrote {args.out}")
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    with Database.open(args.db) as db:
        db.checkpoint()
    _print(args, {"checkpoint": args.db}, f"checkpointed {args.db}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from knnclip.engine.database import Database

    with Database.convert(
        args.db, args.out, index=args.index, storage=args.storage, index_params=_params(args.param)
    ) as db:
        stats = db.stats()
    _print(
        args,
        stats,
        f"converted {args.db} into {args.out}: {stats['entries']} entries, {stats['index']}/{stats['storage']} "
        f"{stats['params']}",
    )
    return 0


def _add_dataset(args: argparse.Namespace) -> int:
    from knnclip.engine.eval.evaluate import add_dataset

    ds = dataset_split(args, args.split, args.limit)
    with segmenter_over(args, args.db) as seg:
        which = None
        if args.only:
            index = {c.name: i for i, c in enumerate(ds.classes)}
            unknown = [n for n in args.only if n not in index]
            if unknown:
                raise InvalidInputError(f"{ds.key} has no classes named {unknown}")
            which = {index[n] for n in args.only}
        done = add_dataset(seg, ds, classes=which, progress=progress_factory(args.json)("add"))
        done["database_entries"] = len(seg.db)
    if args.json:
        print(json.dumps(done))
    else:
        print(
            f"added {done['entries']} entries from {done['images']} images of {ds.key} {ds.split} "
            f"({done['skipped_masks']} masks too small for the key grid); {done['database_entries']} in all"
        )
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``knnclip db`` and its actions."""
    from knnclip.engine.database.kinds import INDEX_KINDS, METRICS, STORAGES

    db = commands.add_parser("db", help="manage an embedding database")
    sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)

    def action(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("db", help="database directory")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.set_defaults(run=run)
        return p

    p = action("create", _create, "create an empty database")
    p.add_argument("--dim", type=int, default=1536, help="embedding size (default 1536, DINOv2 ViT-g/14)")
    p.add_argument("--metric", choices=METRICS, default="cosine")
    p.add_argument("--index", choices=INDEX_KINDS, default="flat")
    p.add_argument(
        "--storage", choices=STORAGES, default=None, help="default fp16 (ivf-pq: PQ codes; ivf-rabitq: an sq8 store)"
    )
    p.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="index parameter: nlist=1024, store=disk"
    )
    p = action("train", _train, "train an IVF / PQ / sq8 index on sample vectors")
    p.add_argument("samples", help=".npy float array [N, D]")
    p = action("add", _add, "add embeddings: .npy files [N, D] with NAME.txt (class names) or NAME.labels.npy beside")
    p.add_argument("inputs", nargs="+", help=".npy files or folders of them")
    p.add_argument(
        "--thing",
        action="append",
        metavar="CLASS",
        help="this class is a thing (countable, one panoptic segment per instance); classes are stuff unless named",
    )
    p = action("remove", _remove, "remove classes and all their entries")
    p.add_argument("classes", nargs="+", help="class names")
    p = action("remove-entries", _remove_entries, "remove single entries by id (every other entry is untouched)")
    p.add_argument("ids", nargs="+", type=int, help="entry ids (as add returned them)")
    p = action("entries", _entries, "list entries with where each came from (id, class, source, mask, time)")
    p.add_argument("--class", dest="class_name", help="only this class's entries")
    p.add_argument("--source", help="only the entries added from this source (an image's file name or digest)")
    p.add_argument("--offset", type=int, default=0, help="skip this many (paging)")
    p.add_argument("--limit", type=int, default=1000, help="list at most this many (default 1000)")
    p = action("remove-source", _remove_source, "remove every entry added from one source (image, upload)")
    p.add_argument("source", help="the source, as db entries lists it")
    p = action("rename", _rename, "rename a class (its id, entries and synonyms are kept)")
    p.add_argument("old", help="the class's name (or a synonym)")
    p.add_argument("new", help="its new name")
    p = action("merge", _merge, "merge a class into another: its entries and names move, it is removed")
    p.add_argument("source", help="the class that goes")
    p.add_argument("target", help="the class that takes its entries and names")
    action("stats", _stats, "entries, classes, index, bytes per entry")
    action("check", _check, "verify every file and log record (read-only)")
    p = action("snapshot", _snapshot, "write a consistent copy to a new directory")
    p.add_argument("out", help="new directory")
    action("checkpoint", _checkpoint, "write the index and empty the log")
    p = action("convert", _convert, "rebuild into a new database with another index (ids, classes, provenance kept)")
    p.add_argument("out", help="new directory")
    p.add_argument("--index", choices=INDEX_KINDS, required=True)
    p.add_argument("--storage", choices=STORAGES, default=None, help="default: the index's own (ivf-rabitq: sq8)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="e.g. nlist=1024, store=disk")
    p = sub.add_parser("add-dataset", help="add a dataset split's ground-truth masks to a database")
    dataset_options(p)
    p.add_argument("--db", required=True, help="database directory (created when missing)")
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--limit", type=int, help="the first N images only")
    p.add_argument("--only", nargs="+", metavar="CLASS", help="only these classes")
    p.set_defaults(run=_add_dataset)
