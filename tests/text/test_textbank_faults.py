"""The text-embedding cache under damage: damaged, foreign, world-writable or other-template
entries are never used; the bank rebuilds them with a warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.damage import damage


def text_bank(models: Path, cache: Path):
    from knnclip.engine.pipeline.models import ModelSet
    from knnclip.engine.text.textbank import TextBank

    m = ModelSet(models, "onnxruntime", "cpu")
    return m, TextBank(m.text, m.tokenizer, m.templates, m.text_weights_sha256, m.context_length, cache_dir=cache)


@pytest.mark.parametrize("kind", ["truncated", "flipped", "empty", "directory", "fifo", "absurd header"])
def test_damaged_text_cache_is_rebuilt_with_a_warning(demo_models: Path, tmp_path: Path, kind: str, caplog) -> None:
    models, bank = text_bank(demo_models, tmp_path)
    reference = bank.rows(["water", "sky"])
    path = bank.cache_path
    models.close()
    damage(kind, path)
    models, bank = text_bank(demo_models, tmp_path)
    with caplog.at_level("WARNING"):
        rows = bank.rows(["water", "sky"])
    np.testing.assert_allclose(rows, reference, atol=1e-6)
    assert "damaged text-embedding cache" in caplog.text or kind in ("directory", "fifo")
    models.close()
    models, bank = text_bank(demo_models, tmp_path)  # rebuilt: a plain, readable cache again
    assert path.is_file() and set(bank._rows) >= {"water", "sky"}  # noqa: SLF001 - the cache's content
    models.close()


@pytest.mark.parametrize(
    "change",
    [
        lambda names, rows: (names, rows[:, :-1]),  # another text model's width
        lambda names, rows: (names, rows.astype(np.float64)),
        lambda names, rows: (np.arange(len(names)), rows),
        lambda names, rows: (names, rows * 3),
    ],
)
def test_foreign_text_cache_entries_are_not_used(demo_models: Path, tmp_path: Path, change) -> None:
    models, bank = text_bank(demo_models, tmp_path)
    reference = bank.rows(["water"])
    with np.load(bank.cache_path) as data:
        names, rows = change(data["names"], data["rows"])
    np.savez(bank.cache_path, names=names, rows=rows)
    path = bank.cache_path
    models.close()
    models, bank = text_bank(demo_models, tmp_path)
    assert bank._rows == {}  # noqa: SLF001 - nothing was taken from the foreign file
    np.testing.assert_allclose(bank.rows(["water"]), reference, atol=1e-6)
    models.close()
    assert path.is_file()


def test_a_text_cache_others_can_write_is_not_trusted(demo_models: Path, tmp_path: Path, caplog) -> None:
    """A cache planted in a shared folder, with the right key and rows swapped between names, is
    never read: the folder is writable by others, so the bank keeps its rows in memory only."""
    planted = tmp_path / "planted-cache"
    models, bank = text_bank(demo_models, planted)
    reference = bank.rows(["water", "sky"])
    with np.load(bank.cache_path) as data:
        names, rows, key = data["names"], data["rows"], data["key"]
    np.savez(bank.cache_path, names=names, rows=rows[::-1].copy(), key=key)  # water gets sky's row
    models.close()
    planted.chmod(0o777)
    with caplog.at_level("WARNING"):
        models, bank = text_bank(demo_models, planted)
    assert bank.cache_path is None and "writable by its group or by all" in caplog.text
    np.testing.assert_allclose(bank.rows(["water", "sky"]), reference, atol=1e-6)
    models.close()


def test_a_text_cache_of_other_templates_is_not_used(demo_models: Path, tmp_path: Path) -> None:
    from knnclip.engine.pipeline.models import ModelSet
    from knnclip.engine.text.textbank import TextBank

    models, bank = text_bank(demo_models, tmp_path)
    bank.rows(["water"])
    m = ModelSet(demo_models, "onnxruntime", "cpu")
    other = TextBank(m.text, m.tokenizer, m.templates[:1], m.text_weights_sha256, m.context_length, cache_dir=tmp_path)
    assert other.cache_path != bank.cache_path and other._rows == {}  # noqa: SLF001 - nothing read
    models.close()
    m.close()
