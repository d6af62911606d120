"""Retrieval settings (knnclip.engine.config): non-finite and out-of-range values are refused,
and a settings file with a bad value is named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "field",
    [
        {"tau": float("nan")},
        {"tau": float("inf")},
        {"tau": 0.0},
        {"tau": 1e-30},
        {"tau": True},
        {"T": float("nan")},
        {"lam": float("-inf")},
        {"lam": 1.5},
        {"mask_threshold": float("nan")},
        {"k": 0},
        {"k": 2.0},
        {"k": True},
    ],
)
def test_config_rejects_non_finite_and_out_of_range_values(field: dict) -> None:
    from knnclip.engine import RetrievalConfig
    from knnclip.engine.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="invalid retrieval config"):
        RetrievalConfig(**field)


def test_config_file_with_a_bad_value_names_the_file(tmp_path: Path) -> None:
    import json

    from knnclip.engine import RetrievalConfig
    from knnclip.engine.errors import InvalidInputError

    path = tmp_path / "best.json"
    path.write_text(json.dumps({"format": "knnclip-retrieval-config/1", "retrieval": {"tau": -1}}))
    with pytest.raises(InvalidInputError, match=f"{path}.*tau"):
        RetrievalConfig.from_file(path)
