"""Child process of the curation crash test: cycles of adds, removing entries and a source, rename, merge,
forever; prints ``CYCLE STEP`` once each change returns (it is durable then).

Usage: python tests/support/curation_writer.py DB_DIR FIRST_CYCLE
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from knnclip.engine import Database
from tests.support.db_helpers import curation_cycle


def main() -> None:
    path, first = sys.argv[1], int(sys.argv[2])
    db = Database.open(path)
    db.auto_checkpoint_bytes = 24 << 10  # checkpoint every few cycles, so kills land inside checkpoints too
    print("ready", flush=True)
    i = first
    while True:
        for step in curation_cycle(db, i):
            print(i, step, flush=True)
        i += 1


if __name__ == "__main__":
    main()
