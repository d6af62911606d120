"""mypy over knnclip.engine and knnclip.export as the package installs them.

The sources live in engine/ and export/, which the wheel installs as knnclip/engine and
knnclip/export. Checked from here under those names (a temporary knnclip/ of symlinks), imports of
knnclip.* resolve to this tree's own modules, so types cross module boundaries; checked as
engine.* they would not resolve and would all be Any. Settings: pyproject.toml's [tool.mypy].
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "knnclip"
        package.mkdir()
        for name, target in (("engine", "engine"), ("export", "export"), ("_C.pyi", "csrc/_C.pyi")):
            (package / name).symlink_to(ROOT / target)
        command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                   "-p", "knnclip.engine", "-p", "knnclip.export"]  # fmt: skip
        return subprocess.run(command, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
