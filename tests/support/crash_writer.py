"""Child process of the crash test: append batches to a database forever, print each batch once add returns.

Usage: python tests/support/crash_writer.py DB_DIR FIRST_BATCH
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from knnclip.engine import Database
from tests.support.db_helpers import CRASH_BATCH, crash_batch


def main() -> None:
    path, first = sys.argv[1], int(sys.argv[2])
    db = Database.open(path)
    db.auto_checkpoint_bytes = 24 << 10  # checkpoint every few batches, so kills land inside checkpoints too
    print("ready", flush=True)
    i = first
    while True:
        db.add(crash_batch(i), [f"batch{i}"] * CRASH_BATCH)
        print(i, flush=True)
        i += 1


if __name__ == "__main__":
    main()
