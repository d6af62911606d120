"""The device pipeline on the CPU: the stages run on a stand-in device whose arrays refuse every
implicit trip to the host (tests/support/standin_device.py), and on torch tensors, against the host
pipeline on the same models and database.

What it proves: the only copies are the image's tensors in (and per-vocabulary constants, once)
and the results out, with a few bytes per query for the segment table; the results on the
stand-in are the host's bit for bit; torch's arithmetic agrees with NumPy's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knnclip.engine.database import Database
from knnclip.engine.pipeline import postprocess
from knnclip.engine.pipeline.arrays import HOST, TorchArrays
from knnclip.engine.pipeline.models import ModelSet
from knnclip.engine.pipeline.search import DeviceScan
from knnclip.engine.pipeline.segmenter import Segmenter
from tests.support.fixture_models import image, open_segmenter
from tests.support.standin_device import DeviceArray, HostConversion, StandInArrays, StandInSession

K = 10


@pytest.fixture(scope="module")
def database(models, tmp_path_factory):
    """A flat database with examples that change some of FC-CLIP's classes."""
    path = tmp_path_factory.mktemp("device") / "db"
    with open_segmenter(models, path) as seg:
        base = seg.segment(image())
        glacier = base.panoptic == next(s.id for s in base.segments if s.name == "glacier")
        triangle = np.tri(250, 330, dtype=bool)
        seg.add_examples([image()], [np.stack([glacier, triangle])], [["ice cave", "triangle"]])
    return path


def segmenter(models_dir, db_path, arrays, *, stand_in: bool = False) -> Segmenter:
    """A read-only segmenter on ``arrays``; with ``stand_in`` its image models hand their outputs
    over on the stand-in device. The database is scanned exactly on every module, so every run
    searches with the same code."""
    model_set = ModelSet(models_dir, "onnxruntime", "cpu")
    if stand_in:
        model_set.fcclip, model_set.dinov2 = StandInSession(model_set.fcclip), StandInSession(model_set.dinov2)
    db = Database.open(db_path, read_only=True)
    return Segmenter(model_set, db, text_cache=None, owns_database=True, arrays=arrays, device_scan=True)


def same_results(a, b) -> None:
    np.testing.assert_array_equal(a.semantic, b.semantic)
    np.testing.assert_array_equal(a.panoptic, b.panoptic)
    assert a.segments == b.segments  # classes, scores, areas and evidence (neighbours, similarities)
    assert [(i.class_id, i.score) for i in a.instances] == [(i.class_id, i.score) for i in b.instances]
    for x, y in zip(a.instances, b.instances, strict=True):
        np.testing.assert_array_equal(x.mask, y.mask)


class TestStandInDevice:
    def test_the_results_are_the_hosts_bit_for_bit(self, models, database):
        with (
            segmenter(models, database, HOST) as host,
            segmenter(models, database, StandInArrays(), stand_in=True) as dev,
        ):
            want, got = host.segment(image(), instance=True), dev.segment(image(), instance=True)
            new = {host.class_id("ice cave"), host.class_id("triangle")}
            assert np.isin(want.semantic, list(new)).mean() > 0.05, "retrieval reaches the output"
            assert want.instances, "and there are instances to compare"
            same_results(want, got)
            for w, g in zip(
                host.segment_batch([image(), image()[:, ::-1].copy()]),
                dev.segment_batch([image(), image()[:, ::-1].copy()]),
                strict=True,
            ):
                same_results(w, g)

    def test_only_the_image_goes_in_and_only_results_come_out(self, models, database):
        with segmenter(models, database, StandInArrays(), stand_in=True) as dev:
            xp = dev.xp
            dev.segment(image(), instance=True)  # uploads the constants: classifier, resize tables, database
            first = xp.transfers.snapshot()
            assert first["to_device"]["constant"] > 0
            before = xp.transfers.snapshot()
            result = dev.segment(image(), instance=True)
            moved = xp.transfers.since(before)
        assert set(moved["to_device"]) <= {"image", "segments"}, "no constant is sent twice"
        assert set(moved["to_host"]) <= {"result", "segments"}
        fcclip_in = dev.models.fcclip.inputs[0]
        h, w = result.semantic.shape
        assert moved["to_device"]["image"] == 4 * 3 * (np.prod(fcclip_in.shape[2:]) + np.prod(dev.models.dinov2_size))
        queries = int(dev.models.fcclip.outputs[0].shape[1])
        # the label maps, each instance query's mask, the evidence (best classes, confidence, changed,
        # k neighbours and their similarities): nothing else, and nothing image-sized twice
        masks = len({i.mask.tobytes() for i in result.instances})
        evidence = queries * (8 + 8 + 4 + 1 + K * (8 + 4))
        assert moved["to_host"]["result"] == 2 * 4 * h * w + masks * h * w + evidence
        # per query: a few scalars for the segment table, never a mask (h x w bytes each)
        assert moved["to_host"].get("segments", 0) + moved["to_device"].get("segments", 0) <= 64 * queries + 2048

    def test_the_stand_in_catches_an_implicit_copy(self):
        xp = StandInArrays()
        a = xp.upload(np.arange(6, dtype=np.float32).reshape(2, 3), "image")
        for convert in (np.asarray, lambda x: float(x[0, 0]), bool, list, lambda x: x + np.ones(3, np.float32)):
            with pytest.raises(HostConversion):
                convert(a)
        assert isinstance(xp.softmax(a), DeviceArray)
        np.testing.assert_array_equal(xp.to_host(a * 2.0, "result"), np.arange(6).reshape(2, 3) * 2.0)
        assert xp.transfers.snapshot() == {"to_device": {"image": 24}, "to_host": {"result": 24}}


class TestTorchArrays:
    """torch's maths (what the GPU runs) against NumPy's, on the CPU."""

    def test_the_pipeline_on_torch_tensors_agrees_with_numpy(self, models, database):
        with segmenter(models, database, HOST) as host, segmenter(models, database, TorchArrays("cpu")) as dev:
            want, got = host.segment(image(), instance=True), dev.segment(image(), instance=True)
        assert (want.semantic == got.semantic).mean() >= 0.999
        assert [(s.class_id, s.area) for s in want.segments] == [(s.class_id, s.area) for s in got.segments]
        np.testing.assert_allclose([s.score for s in got.segments], [s.score for s in want.segments], atol=1e-5)
        np.testing.assert_allclose([i.score for i in got.instances], [i.score for i in want.instances], atol=1e-3)

    def test_argmax_takes_the_first_of_equals_as_numpy_does(self):
        xp = TorchArrays("cpu")
        a = np.array([[1, 3, 3, 0], [2, 2, 2, 2], [0, -1, 5, 5]], np.float32)
        for axis in (0, 1, -1):
            assert xp.argmax(torch.from_numpy(a), axis=axis).tolist() == a.argmax(axis=axis).tolist()


class TestDeviceScan:
    def test_exact_search_matches_float64_in_chunks(self, tmp_path, monkeypatch):
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((500, 16)).astype(np.float32)
        db = Database.create(tmp_path / "db", 16)
        db.add(vectors, [f"c{i % 7}" for i in range(500)])
        monkeypatch.setattr(DeviceScan, "SCORE_BYTES", 4 * 3 * 37)  # 37 rows a chunk: 14 chunks
        queries = rng.standard_normal((3, 16)).astype(np.float32)
        queries[1] = 0.0  # no direction: no neighbours
        for xp in (HOST, StandInArrays()):
            sims, labels = DeviceScan(db, xp).search(xp.upload(queries, "image"), 5)
            sims, labels = xp.to_host(sims, "result"), xp.to_host(labels, "result")
            stored = db.vectors(db.ids_and_labels()[0]).astype(np.float64)  # as the index keeps them (fp16)
            for q in (0, 2):
                scores = stored @ (queries[q] / np.linalg.norm(queries[q].astype(np.float64)))
                best = np.argsort(-scores, kind="stable")[:5]
                np.testing.assert_allclose(sims[q], scores[best], rtol=1e-5)
                assert labels[q].tolist() == [db.ids_and_labels()[1][i] for i in best]
            assert labels[1].tolist() == [-1] * 5 and np.isneginf(sims[1]).all()
        db.close()

    def test_the_copy_follows_the_database(self, tmp_path):
        db = Database.create(tmp_path / "db", 4)
        xp = StandInArrays()
        scan = DeviceScan(db, xp)
        q = xp.upload(np.array([[1, 0, 0, 0]], np.float32), "image")
        assert xp.to_host(scan.search(q, 2)[1], "result").tolist() == [[-1, -1]]
        db.add(np.eye(4, dtype=np.float32)[:2], ["a", "b"])
        assert xp.to_host(scan.search(q, 2)[1], "result").tolist() == [
            [db.vocabulary.find("a").id, db.vocabulary.find("b").id]
        ]
        sent = xp.transfers.snapshot()["to_device"]["constant"]
        db.add(np.eye(4, dtype=np.float32)[2:3], ["c"])
        scan.search(q, 1)
        assert xp.transfers.snapshot()["to_device"]["constant"] - sent == 4 * 2 + 3 * 8, "the new fp16 row, the labels"
        db.remove_class("a")
        assert xp.to_host(scan.search(q, 1)[1], "result").tolist() == [[db.vocabulary.find("b").id]]
        db.close()


def test_the_copy_survives_entries_removed_while_it_reads_them(tmp_path, monkeypatch):
    """A class removed between reading the entries' ids and their vectors (another thread's
    remove_class) makes the device copy read them again, not fail the search."""
    from knnclip.engine.errors import InvalidInputError

    db = Database.create(tmp_path / "db", 4)
    db.add(np.eye(4, dtype=np.float32)[:2], ["a", "b"])
    real, calls = db.vectors, []

    def racing(ids):
        calls.append(len(ids))
        if len(calls) == 1:
            raise InvalidInputError("no entries with ids [0]: removed meanwhile")
        return real(ids)

    monkeypatch.setattr(db, "vectors", racing)
    xp = StandInArrays()
    labels = DeviceScan(db, xp).search(xp.upload(np.array([[0, 1, 0, 0]], np.float32), "image"), 1)[1]
    assert xp.to_host(labels, "result").tolist() == [[db.vocabulary.find("b").id]] and len(calls) == 2
    db.close()


def test_synonym_columns_give_reduceat():
    logits = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    per_class = (1, 3, 2, 1)
    want = np.maximum.reduceat(logits[:, :-1], np.cumsum([0, *per_class])[:-1], axis=1)
    got = logits[:, postprocess.synonym_columns(per_class)].max(-1)
    np.testing.assert_array_equal(got, want)


def test_running_out_of_device_memory_is_a_named_error(models, database):
    """A device that runs out of memory in post-processing fails that image with OutOfMemoryError
    naming the device and the image's size, as the host does for a MemoryError."""
    from knnclip.engine.errors import OutOfMemoryError

    class DeviceOutOfMemory(RuntimeError):
        pass

    class Full(StandInArrays):
        def out_of_memory(self, exc: BaseException) -> bool:
            return isinstance(exc, DeviceOutOfMemory)

        def resample(self, *args):
            raise DeviceOutOfMemory("out of memory")

    with segmenter(models, database, Full(), stand_in=True) as dev:
        with pytest.raises(OutOfMemoryError, match="330x250 image .* on stand-in"):
            dev.segment(image())
    assert TorchArrays("cpu").out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not TorchArrays("cpu").out_of_memory(RuntimeError("something else"))


def test_a_runtime_error_fails_one_image_of_a_batch_only(models, database, caplog):
    """segment_batch's promise holds for a model runtime's own errors, not only the library's: the
    batch is retried image by image, the image that breaks the runtime gets InferenceError naming
    the runtime's error (logged whole), and the others get their results."""
    from knnclip.engine.errors import InferenceError

    class Fragile(StandInSession):
        def infer_device(self, feed):
            if any(sample.mean() > 1.0 for sample in feed["images"].payload):  # a white image: the poisoned one
                raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 700")
            return super().infer_device(feed)

    poisoned = np.full_like(image(), 255)
    with segmenter(models, database, StandInArrays(), stand_in=True) as dev:
        dev.models.fcclip = Fragile(dev.models.fcclip.session)
        with caplog.at_level("ERROR", logger="knnclip.pipeline"):
            results = dev.segment_batch([image(), poisoned, image()[:, ::-1].copy()], batch_size=3)
    assert [type(r).__name__ for r in results] == ["Result", "InferenceError", "Result"]
    assert isinstance(results[1], InferenceError) and "CUDA failure 700" in str(results[1])
    assert "RUNTIME_EXCEPTION" in caplog.text


def test_an_exact_scan_of_an_index_that_is_not_flat_is_refused_by_name(tmp_path):
    from knnclip.engine.errors import InvalidInputError
    from knnclip.engine.pipeline.search import device_scan_for

    db = Database.create(tmp_path / "db", 8, index="hnsw")
    with pytest.raises(InvalidInputError, match="flat indexes; this database's is hnsw"):
        device_scan_for(db, HOST, wanted=True)
    assert device_scan_for(db, StandInArrays()) is None, "by default such an index is searched by faiss"
    db.close()
