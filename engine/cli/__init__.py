"""The `knnclip` command. Sub-commands live in their own modules; this file only dispatches.

Exit codes: 0 success, 1 a command failed on its input, 2 a usage error, 3 a database or artefact
is corrupt, 4 a database is locked by another writer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _info(args: argparse.Namespace) -> int:
    from knnclip.engine import info

    report = info.collect()
    print(json.dumps(report, indent=2) if args.json else info.format_text(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from knnclip.engine import __version__

    parser = argparse.ArgumentParser(
        prog="knnclip", description="kNN-CLIP inference engine: open-vocabulary segmentation with a growing database."
    )
    parser.add_argument("--version", action="version", version=f"knnclip {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="show the build, the backends found and the devices")
    info.add_argument("--json", action="store_true", help="print JSON for scripts")
    info.set_defaults(run=_info)

    from knnclip.engine.cli import bench, db, demo, eval, export, segment

    for group in (db, export, segment, eval, demo, bench):
        group.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    from knnclip.engine.errors import ArtifactCorruptError, DatabaseCorruptError, DatabaseLockedError, KnnclipError

    try:
        return int(args.run(args))
    except (DatabaseCorruptError, ArtifactCorruptError) as exc:
        print(f"knnclip: corrupt: {exc}", file=sys.stderr)
        return 3
    except DatabaseLockedError as exc:
        print(f"knnclip: locked: {exc}", file=sys.stderr)
        return 4
    except (KnnclipError, FileNotFoundError) as exc:
        print(f"knnclip: error: {exc}", file=sys.stderr)
        return 1
