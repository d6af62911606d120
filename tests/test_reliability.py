"""Trust under faults: each test injects its fault for real (damaged files, a full disk, a
read-only directory, hostile names, real threads) and asserts the promise: nothing acknowledged
lost, nothing outside the directory touched, a named error, the other inputs intact."""

from __future__ import annotations

import errno
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import Database
from knnclip.engine.database.wal import HEADER_BYTES
from knnclip.engine.errors import (
    DatabaseCorruptError,
    DatabaseExistsError,
    DatabaseNotTrainedError,
    DatabaseWriteError,
)
from tests.db_helpers import file_digests

DIM = 8
RECORD_HEAD = struct.Struct("<QII")  # length, CRC of the length, CRC of length + payload (wal.py's format 2)


def make_db(path: Path, batches: int = 3) -> None:
    """A database whose batches live only in the log."""
    db = Database.create(path, DIM)
    for i in range(batches):
        db.add(np.random.default_rng(i).normal(size=(4, DIM)), [f"c{i}"] * 4)
    db.close(checkpoint=False)


def record_offsets(log: Path) -> list[int]:
    """Where each record of a format-2 log starts, read from the length fields."""
    data = log.read_bytes()
    offsets, at = [], HEADER_BYTES
    while at + RECORD_HEAD.size <= len(data):
        (length, _, _) = RECORD_HEAD.unpack_from(data, at)
        offsets.append(at)
        at += RECORD_HEAD.size + length
    return offsets


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knnclip.engine.cli", *args], capture_output=True, text=True)


# 1. Write-ahead log: a damaged record is never a torn tail ---------------------------------------
@pytest.mark.parametrize("record", [0, 1])
@pytest.mark.parametrize("bit", [0, 13, 40])
def test_flipped_bit_in_a_length_field_is_corruption_not_a_tail(tmp_path: Path, record: int, bit: int) -> None:
    path = tmp_path / "db"
    make_db(path)
    log = path / "wal.log"
    data = bytearray(log.read_bytes())
    data[record_offsets(log)[record] + bit // 8] ^= 1 << (bit % 8)
    log.write_bytes(bytes(data))
    before = file_digests(path)
    for read_only in (True, False):
        with pytest.raises(DatabaseCorruptError, match="record head is damaged"):
            Database.open(path, read_only=read_only)
    done = cli("db", "check", str(path))
    assert done.returncode == 3 and "record head is damaged" in done.stderr
    after = file_digests(path)
    after.pop("LOCK", None)
    before.pop("LOCK", None)
    assert after == before, "nothing was cut, truncated or checkpointed"


def test_torn_tail_is_reported_by_check_and_kept_aside_by_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    log = path / "wal.log"
    whole = log.read_bytes()
    last = record_offsets(log)[-1]
    torn = whole[last:][: (len(whole) - last) // 3]  # a further record's first third, as a crash leaves it
    log.write_bytes(whole + torn)
    done = cli("db", "check", str(path))
    assert done.returncode == 0 and f"torn record of {len(torn)} bytes at byte {len(whole)}" in done.stdout
    with Database.open(path) as db:
        assert len(db) == 12
        (aside,) = path.glob("wal.log.torn-*")
        assert aside.read_bytes() == torn and db.stats()["log_tail_kept"] == str(aside)
        db.add(np.ones((1, DIM)), ["after"])
    with Database.open(path, read_only=True) as db:
        assert db.classes == {"c0": 4, "c1": 4, "c2": 4, "after": 1}
    assert (path / aside.name).exists(), "the next writer open does not delete what was kept aside"


def test_head_cut_short_then_zeros_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    log = path / "wal.log"
    whole = log.read_bytes()
    head = whole[record_offsets(log)[0] :][:5]  # 5 of a head's 16 bytes reached the disk, then zeros
    log.write_bytes(whole + head + bytes(4000))
    with Database.open(path, read_only=True) as db:
        assert len(db) == 12 and db.stats()["log_torn_bytes"] == 4005


def test_format_1_log_is_read_and_rewritten_in_format_2(tmp_path: Path) -> None:
    """A database whose log an older knnclip wrote (records without the head checksum)."""
    from knnclip import _C

    path = tmp_path / "db"
    make_db(path)
    log = path / "wal.log"
    data = log.read_bytes()
    v1 = bytearray(b"KNNCWAL1" + data[8:HEADER_BYTES])
    for at in record_offsets(log):
        length, _, _ = RECORD_HEAD.unpack_from(data, at)
        payload = data[at + RECORD_HEAD.size : at + RECORD_HEAD.size + length]
        length_bytes = struct.pack("<Q", length)
        v1 += length_bytes + struct.pack("<I", _C.crc32c(payload, _C.crc32c(length_bytes))) + payload
    log.write_bytes(bytes(v1))
    with Database.open(path, read_only=True) as db:
        assert db.classes == {"c0": 4, "c1": 4, "c2": 4}
    with Database.open(path) as db:  # a writer checkpoints the old log away
        assert db.stats()["log_bytes"] == HEADER_BYTES
    assert log.read_bytes()[:8] == b"KNNCWAL2"
    with Database.open(path, read_only=True) as db:
        assert db.classes == {"c0": 4, "c1": 4, "c2": 4}


# 2. An operation completes durably or changes nothing -------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 4 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Fill the file system until writes fail with ENOSPC; returns the filler (delete it to free space)."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_full_disk_train_leaves_the_database_untrained(small_disk: Path) -> None:
    path = small_disk / "db"
    x = np.random.default_rng(0).normal(size=(400, DIM)).astype(np.float32)
    Database.create(path, DIM, index="ivf-flat", index_params={"nlist": 4}).close()
    db = Database.open(path)
    filler = fill(small_disk)
    with pytest.raises(DatabaseWriteError, match="No space left on device.*nothing was changed"):
        db.train(x)
    assert not db.is_trained
    with pytest.raises(DatabaseNotTrainedError):
        db.add(x[:3], ["a"] * 3)
    db.close()
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == [], "no temporary file left"
    filler.unlink()
    with Database.open(path) as db:
        assert not db.is_trained
        db.train(x)
        db.add(x[:3], ["a"] * 3)
    with Database.open(path, read_only=True) as db:
        assert db.classes == {"a": 3}


def test_full_disk_add_is_refused_and_nothing_changes(small_disk: Path) -> None:
    path = small_disk / "db"
    rng = np.random.default_rng(1)
    db = Database.create(path, DIM)
    db.add(rng.normal(size=(5, DIM)), ["a"] * 5)
    q = rng.normal(size=(3, DIM))
    before = db.search(q, 4)
    filler = fill(small_disk)
    big = rng.normal(size=(2000, DIM))  # 72 kB: more than the few bytes left
    with pytest.raises(DatabaseWriteError, match="could not append to the log.*nothing was changed"):
        db.add(big, ["b"] * len(big))
    assert len(db) == 5 and db.classes == {"a": 5}
    np.testing.assert_array_equal(db.search(q, 4).ids, before.ids)
    db.close(checkpoint=False)
    filler.unlink()
    with Database.open(path) as db:
        assert db.classes == {"a": 5}
        db.add(big[:2], ["b"] * 2)
        assert db.classes == {"a": 5, "b": 2}


def test_failed_automatic_checkpoint_does_not_fail_the_add(tmp_path: Path, monkeypatch) -> None:
    """The add is durable before the checkpoint runs, so it is acknowledged exactly once."""
    import faiss

    path = tmp_path / "db"
    db = Database.create(path, DIM)
    db.auto_checkpoint_bytes = 1  # every add triggers one

    def no_space(index, name):
        raise RuntimeError("Error in faiss::FileIOWriter::operator(): fwrite failed: No space left on device")

    monkeypatch.setattr(faiss, "write_index", no_space)
    ids = db.add(np.ones((2, DIM)), ["a", "a"])
    ids2 = db.add(np.ones((1, DIM)), ["a"])
    assert ids.tolist() == [0, 1] and ids2.tolist() == [2]
    monkeypatch.undo()
    db.close(checkpoint=False)
    with Database.open(path, read_only=True) as db:
        assert db.classes == {"a": 3}, "stored once each, in the log"
    assert not list(path.glob("index.000002.faiss")), "the failed generation was removed"


# 3. Named errors ----------------------------------------------------------------------------------
def test_read_only_file_system_is_a_named_error_and_one_cli_line(small_disk: Path) -> None:
    path = small_disk / "db"
    make_db(path)
    np.save(small_disk / "x.npy", np.ones((2, DIM), np.float32))
    (small_disk / "x.txt").write_text("a\na\n")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(DatabaseWriteError, match="Read-only file system.*read_only=True"):
        Database.open(path)
    with Database.open(path, read_only=True) as db:
        assert len(db) == 12
    done = cli("db", "add", str(path), str(small_disk / "x.npy"))
    assert done.returncode == 5 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Read-only file system" in done.stderr


def test_racing_creates_one_wins_the_other_gets_a_named_error(tmp_path: Path) -> None:
    import threading

    target, errors, barrier = tmp_path / "db", [], threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        try:
            Database.create(target, DIM).close()
        except Exception as exc:  # noqa: BLE001 - collected and checked below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 7 and all(isinstance(e, DatabaseExistsError) for e in errors), errors
    with Database.open(target, read_only=True) as db:
        assert len(db) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["db"], "no temporary folder left"


# 4. Files stay inside their folder ----------------------------------------------------------------
def test_manifest_naming_a_file_outside_is_refused_and_the_file_untouched(tmp_path: Path) -> None:
    import json

    from knnclip.engine.fsutil import json_content_hash

    path, outside = tmp_path / "db", tmp_path / "outside"
    make_db(path)
    with Database.open(path) as db:
        db.checkpoint()
    outside.mkdir()
    manifest = json.loads((path / "manifest.json").read_text())
    index_name = manifest["files"]["index"]["name"]
    (outside / "index.faiss").write_bytes((path / index_name).read_bytes())
    manifest["files"]["index"]["name"] = "../outside/index.faiss"
    manifest.pop("manifest_sha256")
    manifest["manifest_sha256"] = json_content_hash(manifest)  # recomputed, as anyone can
    (path / "manifest.json").write_text(json.dumps(manifest))
    for read_only in (True, False):
        with pytest.raises(DatabaseCorruptError, match="only index"):
            Database.open(path, read_only=read_only)
    assert (outside / "index.faiss").exists()


def test_symlinked_database_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    entries = next(path.glob("entries.*.npy"))
    moved = tmp_path / "elsewhere.npy"
    entries.rename(moved)
    entries.symlink_to(moved)
    with pytest.raises(DatabaseCorruptError, match="symlink"):
        Database.open(path, read_only=True)


def test_planted_symlink_cannot_redirect_an_atomic_write(tmp_path: Path) -> None:
    """Whatever an attacker plants beside the target, including the old predictable temporary
    name, the write goes to a fresh exclusive file and the planted link's target is untouched."""
    import os

    from knnclip.engine.fsutil import atomic_path, atomic_write_bytes

    victim = tmp_path / "victim"
    victim.write_text("precious")
    folder = tmp_path / "shared"
    folder.mkdir()
    target = folder / "manifest.json"
    for name in (f".{target.name}.{os.getpid()}.tmp", f".{target.name}.tmp"):
        (folder / name).symlink_to(victim)
    atomic_write_bytes(target, b"new")
    with atomic_path(folder / "index.faiss") as tmp:
        assert not tmp.is_symlink() and tmp.stat().st_size == 0
        tmp.write_bytes(b"index")
    assert victim.read_text() == "precious" and target.read_bytes() == b"new"


# 7. Locks are released ----------------------------------------------------------------------------
def test_writer_dropped_without_close_releases_its_lock(tmp_path: Path) -> None:
    import gc

    path = tmp_path / "db"
    make_db(path)
    writer = Database.open(path)
    writer.add(np.ones((1, DIM)), ["x"])
    del writer
    gc.collect()
    with Database.open(path) as db:  # would raise DatabaseLockedError if the lock leaked
        assert db.classes["x"] == 1


# 3 and 5. Damaged caches and artefacts: named errors, or rebuilt with a warning ---------------
@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> Path:
    """The demo's seeded models, exported once for this module."""
    pytest.importorskip("torch", reason="the models are built with torch (pip install torch)")
    from knnclip.engine.demo.run import DemoSettings, build_models

    return build_models(DemoSettings(out=tmp_path_factory.mktemp("demo")), say=lambda _: None)


def text_bank(models: Path, cache: Path):
    from knnclip.engine.pipeline.models import ModelSet
    from knnclip.engine.text.textbank import TextBank

    m = ModelSet(models, "onnxruntime", "cpu")
    return m, TextBank(m.text, m.tokenizer, m.templates, m.text_weights_sha256, m.context_length, cache_dir=cache)


def _damage(kind: str, path: Path) -> None:
    data = path.read_bytes() if path.is_file() else b""
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flipped":
        flipped = bytearray(data)
        for at in range(40, len(flipped), 97):
            flipped[at] ^= 0x20
        path.write_bytes(bytes(flipped))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("x")
    elif kind == "fifo":
        import os

        path.unlink()
        os.mkfifo(path)
    elif kind == "absurd header":  # an .npy member claiming an enormous shape
        import io
        import zipfile

        header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (4000000000000, 64), }"
        npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + 1) + header + b"\n"
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr("names.npy", npy)
            z.writestr("rows.npy", npy)
        path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("kind", ["truncated", "flipped", "empty", "directory", "fifo", "absurd header"])
def test_damaged_text_cache_is_rebuilt_with_a_warning(demo_models: Path, tmp_path: Path, kind: str, caplog) -> None:
    models, bank = text_bank(demo_models, tmp_path)
    reference = bank.rows(["water", "sky"])
    path = bank.cache_path
    models.close()
    _damage(kind, path)
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
    shared = tmp_path / "shared-cache"
    models, bank = text_bank(demo_models, shared)
    reference = bank.rows(["water", "sky"])
    with np.load(bank.cache_path) as data:
        names, rows, key = data["names"], data["rows"], data["key"]
    np.savez(bank.cache_path, names=names, rows=rows[::-1].copy(), key=key)  # water gets sky's row
    models.close()
    shared.chmod(0o777)
    with caplog.at_level("WARNING"):
        models, bank = text_bank(demo_models, shared)
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


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta: {**meta, "key": ["not", "a", "dict"]},  # was an AttributeError
        lambda meta: {**meta, "plan_bytes": 10**30},
        lambda meta: {**meta, "plan_bytes": "many"},
        lambda meta: [meta],
    ],
)
def test_damaged_engine_cache_entry_is_rebuilt(tmp_path: Path, damage) -> None:
    import json

    from knnclip.engine.backends.tensorrt.cache import EngineCache
    from tests.test_engine_cache import KEY

    cache = EngineCache(tmp_path)
    cache.put(KEY, b"plan")
    (meta_path,) = tmp_path.glob("*.json")
    meta_path.write_text(json.dumps(damage(json.loads(meta_path.read_text()))))
    assert cache.get(KEY) is None
    assert cache.get_or_build(KEY, lambda: b"rebuilt") == b"rebuilt"
    assert cache.get(KEY) == b"rebuilt"


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_engine_cache_entry_replaced_by_a_directory_or_fifo_is_rebuilt(tmp_path: Path, kind: str) -> None:
    from knnclip.engine.backends.tensorrt.cache import EngineCache
    from tests.test_engine_cache import KEY

    cache = EngineCache(tmp_path)
    cache.put(KEY, b"plan")
    for path in tmp_path.glob("*.plan"):
        _damage(kind, path)
    assert cache.get(KEY) is None  # a FIFO is never opened for reading (it would block)
    assert cache.get_or_build(KEY, lambda: b"rebuilt") == b"rebuilt"


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
    manifest = read_manifest(art, verify_files=False)
    for generated in ("format", "format_version", "created", "knnclip_version"):
        manifest.pop(generated, None)
    manifest["files"] = {role: record["name"] for role, record in manifest["files"].items()}
    manifest["files"]["torch_weights"] = "weights.pt"
    write_manifest(art, manifest)
    with pytest.raises(ArtifactCorruptError, match="weights.pt.*torch weights do not load"):
        open_session(art, "torch", "cpu")


# 6. One vocabulary per call under concurrency -----------------------------------------------------
def test_segment_while_the_vocabulary_changes(demo_models: Path, tmp_path: Path) -> None:
    import threading

    from knnclip.engine import Segmenter
    from knnclip.engine.demo.synthetic import make_split

    samples = make_split(6, seed=3)
    seg = Segmenter.from_dir(demo_models, tmp_path / "db", backend="onnxruntime", device="cpu", text_cache=None)
    seg.add_examples([s.image for s in samples[:2]], [s.masks for s in samples[:2]], [s.names for s in samples[:2]])
    failures, calls, stop = [], [0], threading.Event()

    def segmenter_thread() -> None:
        while not stop.is_set():
            try:
                results = seg.segment_batch([s.image for s in samples[2:4]], batch_size=2)
                failures.extend(r for r in results if not hasattr(r, "semantic"))
                seg.segment(samples[4].image)
                calls[0] += 3
            except Exception as exc:  # noqa: BLE001 - every failure is collected and asserted on
                failures.append(exc)

    threads = [threading.Thread(target=segmenter_thread) for _ in range(4)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(0)
    for i in range(12):  # the mutator: classes come and go under the segmenters
        name = f"new class {i}"
        seg.db.add(rng.normal(size=(3, seg.db.dim)), [name] * 3)
        if i % 3 == 2:
            seg.remove_class(f"new class {i - 1}")
    stop.set()
    for t in threads:
        t.join()
    seg.close()
    assert failures == [] and calls[0] > 0


# 9. Numeric edges -------------------------------------------------------------------------------
def reference_retrieval_probs(sims: np.ndarray, labels: np.ndarray, num_classes: int, tau: float) -> np.ndarray:
    """float64, from the definition, with the max subtracted before dividing by tau."""
    out = np.zeros((len(sims), num_classes))
    for i, (s, lab) in enumerate(zip(sims.astype(np.float64), labels, strict=True)):
        real = lab >= 0
        if not real.any():
            continue
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            d = (s[real] - s[real].max()) / np.float64(np.float32(tau)) if np.float32(tau) > 0 else None
        w = np.where(s[real] == s[real].max(), 1.0, 0.0) if d is None else np.where(d == 0, 1.0, np.exp(d))
        np.add.at(out[i], lab[real], w / w.sum())
    return out


@pytest.mark.parametrize("tau", [1e-50, 1e-30, 1e-8, 0.05, 1e30])
@pytest.mark.parametrize("scale", [1.0, 1e30])
def test_retrieval_probs_are_finite_at_numeric_edges(tau: float, scale: float) -> None:
    from knnclip.engine import ops

    rng = np.random.default_rng(5)
    sims = (rng.uniform(-1, 1, size=(40, 7)) * scale).astype(np.float32)
    sims[:, 3] = sims[:, 2]  # ties
    labels = rng.integers(-1, 5, size=(40, 7))
    got = ops.retrieval_probs(sims, labels, 5, tau)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference_retrieval_probs(sims, labels, 5, tau), atol=1e-5)


def test_retrieval_probs_refuse_infinite_tau() -> None:
    from knnclip.engine import ops

    with pytest.raises(ValueError, match="tau must be a finite number"):
        ops.retrieval_probs(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.int64), 2, float("inf"))


@pytest.mark.parametrize(
    "field",
    [
        {"tau": float("nan")}, {"tau": float("inf")}, {"tau": 0.0}, {"tau": 1e-30}, {"tau": True},
        {"T": float("nan")}, {"lam": float("-inf")}, {"lam": 1.5}, {"mask_threshold": float("nan")},
        {"k": 0}, {"k": 2.0}, {"k": True},
    ],
)  # fmt: skip
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


# 8. Extreme images --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 5000), (5000, 1), (1, 1), (3, 2000)])
def test_extreme_aspect_ratios_segment(demo_models: Path, tmp_path: Path, shape: tuple[int, int]) -> None:
    from knnclip.engine import Segmenter

    with Segmenter.from_dir(demo_models, tmp_path / "db", device="cpu", text_cache=None) as seg:
        seg.add_class("sky")
        image = np.full((*shape, 3), 120, np.uint8)
        result = seg.segment(image)
        assert result.semantic.shape == shape and result.panoptic.shape == shape
        (batch,) = seg.segment_batch([image])
        np.testing.assert_array_equal(batch.semantic, result.semantic)


PEAK_SCRIPT = """
import sys, json, numpy as np
from pathlib import Path
from knnclip.engine import Segmenter
from knnclip.engine.bench.harness import peak_rss_mib
seg = Segmenter.from_dir(sys.argv[1], sys.argv[2], device="cpu", text_cache=None)
seg.add_class("sky"); seg.add_class("ground"); seg.add_class("cat", thing=True)
small = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
seg.segment(small)
image = np.random.default_rng(1).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
before = peak_rss_mib()
result = seg.segment(image)
after = peak_rss_mib()
queries = seg.models.fcclip.outputs[0].shape[1]
print(json.dumps({"growth_mib": after - before, "queries": queries, "segments": len(result.segments)}))
"""


def test_post_processing_memory_does_not_scale_with_queries_times_pixels(demo_models: Path, tmp_path: Path) -> None:
    """A 12-megapixel image with the mask budget at 32 MiB: the process's peak grows by a few
    bytes per pixel, not by queries x pixels x 4 bytes (2.3 GiB for the demo model's 50 queries)."""
    import json
    import os

    env = {**os.environ, "KNNCLIP_MASK_BUDGET_BYTES": str(32 << 20)}
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(demo_models), str(tmp_path / "db")],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    report = json.loads(done.stdout.strip().splitlines()[-1])
    full_stack_mib = report["queries"] * 3000 * 4000 * 4 / 2**20
    assert report["growth_mib"] < 0.2 * full_stack_mib, report


# 4 (datasets), 6 (readers racing checkpoints), 7 (failed opens), 8 (one image never stops others)
@pytest.mark.parametrize("hostile", ["/etc/passwd", "../../outside.jpg", "sub/../../outside.jpg", "link.jpg"])
def test_annotation_file_names_cannot_leave_the_dataset(tmp_path: Path, hostile: str) -> None:
    import json

    from knnclip.engine.errors import DatasetError
    from knnclip.engine.eval.datasets import open_dataset
    from tests.dataset_writers import samples, write_panoptic

    data = samples(2, 2, size=(32, 48))
    base = write_panoptic(tmp_path / "data", "coco-panoptic", data)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((base / "val2017" / "val_00000.jpg").read_bytes())
    (base / "val2017" / "link.jpg").symlink_to(outside)
    spec_path = base / "annotations" / "panoptic_val2017.json"
    spec = json.loads(spec_path.read_text())
    spec["images"][0]["file_name"] = hostile
    spec_path.write_text(json.dumps(spec))
    ds = open_dataset("coco-panoptic", tmp_path / "data", "val")
    index = next(i for i, name in enumerate(ds.names) if name == "val_00000")
    with pytest.raises(DatasetError, match="leads outside|symlink"):
        ds.image(index)
    ds.image(1 - index)  # the other image is fine


def test_readers_racing_checkpoints_never_fail(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "db"
    make_db(path)
    writer = Database.open(path)
    stop, failures, reads = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                with Database.open(path, read_only=True) as db:
                    for _ in range(3):
                        db.stats()
                    assert len(db) >= 12
                reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is collected and asserted on
                failures.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(2)
    for i in range(60):
        writer.add(rng.normal(size=(2, DIM)), [f"w{i % 4}"] * 2)
        writer.checkpoint()
    stop.set()
    for t in threads:
        t.join()
    writer.close()
    assert failures == [] and reads[0] > 10


def test_failed_segmenter_open_releases_the_database(demo_models: Path, tmp_path: Path) -> None:
    from knnclip.engine import Segmenter
    from knnclip.engine.errors import InvalidInputError

    path = tmp_path / "db"
    Database.create(path, 7).close()  # the wrong width for the demo's DINOv2
    with pytest.raises(InvalidInputError, match="7-d embeddings"):
        Segmenter.from_dir(demo_models, path, device="cpu", text_cache=None)
    Database.open(path).close()  # not left locked


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
        [sys.executable, "-m", "knnclip.engine.cli", "segment", str(big), str(small), "--models", str(demo_models),
         "--db", str(tmp_path / "db"), "--out", str(tmp_path / "out"), "--device", "cpu"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 1 and "larger than the limit of 4000000 pixels" in done.stderr
    assert (tmp_path / "out" / "small.json").is_file() and not (tmp_path / "out" / "big.json").exists()


def test_atomic_writes_are_readable_by_others(tmp_path: Path) -> None:
    import stat

    from knnclip.engine.fsutil import atomic_path, atomic_write_bytes

    atomic_write_bytes(tmp_path / "a", b"x")
    with atomic_path(tmp_path / "b") as tmp:
        tmp.write_bytes(b"y")
    for name in ("a", "b"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
