"""The pipeline's tests run on the official fixtures' models, exported once per module."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tokenizer: object) -> Path:
    """The resize fixture's FC-CLIP (288x384) and the DINOv2 fixture, exported with torch weights."""
    from tests.support.fixture_models import export_fixture_models

    return export_fixture_models(tmp_path_factory.mktemp("models"))
