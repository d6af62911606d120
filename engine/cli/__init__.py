"""The `knnclip` command. Sub-commands live in their own modules; this file only dispatches.

Exit codes: 0 success, 1 a command failed on its input (or an optional dependency is missing: the
line names the extra to install), 2 a usage error, 3 a database or artefact is corrupt, 4 a
database is locked by another writer (or busy: a reader kept racing its checkpoints), 5 a write
failed (disk full, read-only file system, I/O error; nothing was changed), 130 interrupted. Every
error is one line on stderr.
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

    from knnclip.engine.cli import bench, db, demo, eval, export, segment, serve

    for group in (db, export, segment, serve, eval, demo, bench):
        group.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from knnclip.engine.errors import missing_module_error

    try:
        parser = build_parser()
    except ModuleNotFoundError as exc:  # an install without the cpu or gpu extra: say which to add
        missing = missing_module_error(exc, "knnclip")
        if missing is None:
            raise
        return _fail("missing dependency", missing, 1)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    from knnclip.engine.errors import (
        ArtifactCorruptError,
        DatabaseBusyError,
        DatabaseCorruptError,
        DatabaseLockedError,
        DatabaseWriteError,
        KnnclipError,
        UsageError,
    )

    try:
        return int(args.run(args))
    except UsageError as exc:
        print(f"knnclip {args.command}: usage: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional dependency: one line naming its extra
        missing = missing_module_error(exc, f"knnclip {args.command}")
        if missing is None:
            raise
        return _fail("missing dependency", missing, 1)
    except (DatabaseCorruptError, ArtifactCorruptError) as exc:
        return _fail("corrupt", exc, 3)
    except DatabaseLockedError as exc:
        return _fail("locked", exc, 4)
    except DatabaseBusyError as exc:
        return _fail("busy", exc, 4)
    except DatabaseWriteError as exc:
        return _fail("could not write", exc, 5)
    except (KnnclipError, OSError) as exc:  # OSError: a file the command was given cannot be read
        return _fail("error", exc, 1)
    except KeyboardInterrupt:
        print("knnclip: interrupted", file=sys.stderr)
        return 130


def _fail(kind: str, exc: BaseException, code: int) -> int:
    """One line on standard error, never a traceback, for an error the user can act on."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"knnclip: {kind}: {message}", file=sys.stderr)
    return code
