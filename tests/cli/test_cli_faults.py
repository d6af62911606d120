"""knnclip segment goes on after an image it refuses: the exit code says one failed, the others
are written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from knnclip.engine import Database


def test_cli_segment_goes_on_after_an_image_that_is_refused(demo_models: Path, tmp_path: Path) -> None:
    """An image over the pixel limit is refused before decoding; the next one is still segmented."""
    import os

    from PIL import Image

    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("RGB", (3000, 3000), (10, 20, 30)).save(big)
    Image.new("RGB", (64, 48), (10, 20, 30)).save(small)
    Database.create(tmp_path / "db", 96).close()
    with Database.open(tmp_path / "db") as db:
        db.add_class("sky")
    env = {**os.environ, "KNNCLIP_MAX_IMAGE_PIXELS": str(2000 * 2000)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "knnclip.engine.cli",
            "segment",
            str(big),
            str(small),
            "--models",
            str(demo_models),
            "--db",
            str(tmp_path / "db"),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 1 and "larger than the limit of 4000000 pixels" in done.stderr
    assert (tmp_path / "out" / "small.json").is_file() and not (tmp_path / "out" / "big.json").exists()
