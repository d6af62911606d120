"""Model files the backends refuse by name: torch weights that do not unpickle."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_torch_weights_that_do_not_unpickle_are_a_named_error(demo_models: Path, tmp_path: Path) -> None:
    """A weights.pt that torch refuses (here: a pickle with a global, refused by weights_only)."""
    import pickle
    import shutil

    from knnclip.engine.artifact import read_manifest, write_manifest
    from knnclip.engine.backends import open_session
    from knnclip.engine.errors import ArtifactCorruptError

    art = tmp_path / "dinov2"
    shutil.copytree(demo_models / "dinov2", art)
    (art / "weights.pt").write_bytes(pickle.dumps(Path("/")))
    manifest = read_manifest(art, verify_files=False).to_json()
    for generated in ("format", "format_version", "created", "knnclip_version"):
        manifest.pop(generated, None)
    manifest["files"] = {role: record["name"] for role, record in manifest["files"].items()}
    manifest["files"]["torch_weights"] = "weights.pt"
    write_manifest(art, manifest)
    with pytest.raises(ArtifactCorruptError, match="weights.pt.*torch weights do not load"):
        open_session(art, "torch", "cpu")
