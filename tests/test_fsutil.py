"""Atomic writes (knnclip.engine.fsutil): a planted link is replaced, never followed, and what is
written is readable by others as a plain write would be."""

from __future__ import annotations

from pathlib import Path


def test_planted_symlink_cannot_redirect_an_atomic_write(tmp_path: Path) -> None:
    """Whatever an attacker plants beside the target, including the old predictable temporary
    name, the write goes to a fresh exclusive file and the planted link's target is untouched."""
    import os

    from knnclip.engine.fsutil import atomic_path, atomic_write_bytes

    victim = tmp_path / "victim"
    victim.write_text("precious")
    folder = tmp_path / "common-folder"
    folder.mkdir()
    target = folder / "manifest.json"
    for name in (f".{target.name}.{os.getpid()}.tmp", f".{target.name}.tmp"):
        (folder / name).symlink_to(victim)
    atomic_write_bytes(target, b"new")
    with atomic_path(folder / "index.faiss") as tmp:
        assert not tmp.is_symlink() and tmp.stat().st_size == 0
        tmp.write_bytes(b"index")
    assert victim.read_text() == "precious" and target.read_bytes() == b"new"


def test_atomic_writes_are_readable_by_others(tmp_path: Path) -> None:
    import stat

    from knnclip.engine.fsutil import atomic_path, atomic_write_bytes

    atomic_write_bytes(tmp_path / "a", b"x")
    with atomic_path(tmp_path / "b") as tmp:
        tmp.write_bytes(b"y")
    for name in ("a", "b"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
