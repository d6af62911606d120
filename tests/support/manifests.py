"""Manifests of artefacts that exist only for a test: ``body`` made into a typed Manifest, with
what it leaves out filled in (a generic kind, no files, no outputs)."""

from __future__ import annotations

from typing import Any

from knnclip.engine.artifact import Manifest


def stand_in_manifest(body: dict[str, Any]) -> Manifest:
    defaults = {"kind": "test", "files": {}, "inputs": [], "outputs": []}
    return Manifest.from_json({**defaults, **body}, "manifest.json")
