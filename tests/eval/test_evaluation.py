"""Evaluation through the real pipeline (seeded demo models exported to ONNX, a FAISS database)
on tiny datasets written in the real layouts: the continual protocol with zero forgetting for
the exact index, semantic and panoptic scores equal to independent recomputations, the sweep,
the CLI and its reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from knnclip.engine.config import RetrievalConfig
from knnclip.engine.errors import InvalidInputError
from knnclip.engine.eval.continual import ContinualSettings, class_steps, run_continual
from knnclip.engine.eval.datasets import open_dataset
from knnclip.engine.eval.evaluate import add_dataset, class_lut, evaluate, register_classes
from knnclip.engine.eval.sweep import SweepGrid, run_sweep, split_held_out
from knnclip.engine.pipeline.segmenter import Segmenter
from tests.support.dataset_writers import samples, write_panoptic, write_semantic
from tests.support.metrics_reference import reference_iou, reference_pq


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from knnclip.engine.demo.run import DemoSettings, build_models

    return build_models(DemoSettings(out=tmp_path_factory.mktemp("demo")), say=lambda _: None)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    data = samples(12, 4, size=(96, 128))
    write_semantic(root, "ade20k-150", data)
    write_panoptic(root, "coco-panoptic", data)
    write_panoptic(root, "ade20k-panoptic", data)  # beside ade20k-150 in ADEChallengeData2016, as prepared
    return root


def segmenter(models, path, **kw):
    return Segmenter.from_dir(models, path, text_cache=None, **kw)


class TestContinual:
    """Catches a database whose growth disturbs old classes, and per-step scores that do not
    agree with an independent recomputation."""

    def test_steps_split_every_class_once(self):
        steps = class_steps(10, 3, shuffle=True, seed=1)
        assert len(steps) == 3 and sorted(sum(steps, [])) == list(range(10))
        assert [len(s) for s in class_steps(8, 3)] == [3, 3, 2]
        with pytest.raises(InvalidInputError, match="steps"):
            class_steps(3, 4)

    def test_protocol_end_to_end_with_zero_forgetting(self, models, root, tmp_path):
        train = open_dataset("ade20k-150", root, "train")
        val = open_dataset("ade20k-150", root, "val")
        with segmenter(models, tmp_path / "db") as seg:
            report = run_continual(seg, train, val, ContinualSettings(steps=3))
            steps = report["steps"]
            assert [s["seen"] for s in steps] == [3, 6, 8]
            assert report["zero_forgetting"] is True and report["max_forgetting"] == 0.0
            assert all(s["forgetting"]["identical"] for s in steps[1:]) and "forgetting" not in steps[0]
            entries = [s["database"]["entries"] for s in steps]
            assert entries[0] > 0 and entries == sorted(entries) and entries[-1] == len(seg.db)
            assert steps[-1]["database"]["code_bytes"] == len(seg.db) * steps[-1]["database"]["code_bytes_per_entry"]
            # The last step scores all classes: recompute its IoU independently from the segmentations.
            lut = class_lut(seg, val.classes)
            preds = [lut[seg.segment(val.image(i)).semantic] for i in range(len(val))]
            gts = [val.semantic(i) for i in range(len(val))]
            expected = reference_iou(preds, gts, len(val.classes), val.ignore)
            got = np.array([np.nan if v is None else v for v in steps[-1]["iou"].values()])
            np.testing.assert_allclose(got, expected, atol=1e-6)
            # Classes added later are no part of earlier scores.
            assert set(steps[0]["iou"]) == {c.name for c in val.classes[:3]}

    def test_refuses_a_database_that_is_not_empty(self, models, root, tmp_path):
        train = open_dataset("ade20k-150", root, "train")
        with segmenter(models, tmp_path / "db") as seg:
            seg.add_class("sky")
            with pytest.raises(InvalidInputError, match="empty database"):
                run_continual(seg, train, train)


class TestEvaluate:
    def test_panoptic_scores_match_the_pairwise_definition(self, models, root, tmp_path):
        train = open_dataset("coco-panoptic", root, "train")
        val = open_dataset("coco-panoptic", root, "val")
        with segmenter(models, tmp_path / "db") as seg:
            done = add_dataset(seg, train)
            assert done["entries"] > 0 and done["images"] == len(train)
            ev = evaluate(seg, val)
            lut = class_lut(seg, val.classes)
            pairs = []
            preds, gts = [], []
            for i in range(len(val)):
                r = seg.segment(val.image(i))
                ids, info = val.segments(i)
                pairs.append((r.panoptic, {s.id: int(lut[s.class_id]) for s in r.segments}, ids, info))
                preds.append(lut[r.semantic])
                gts.append(val.semantic(i))
        np.testing.assert_allclose(ev.panoptic.per_class()["pq"], reference_pq(pairs, len(val.classes)), atol=1e-12)
        np.testing.assert_allclose(ev.confusion.iou(), reference_iou(preds, gts, len(val.classes), 255), atol=1e-12)
        assert ev.panoptic.summary()["all"]["n"] > 0

    def test_register_is_idempotent_and_lut_maps_names(self, models, root, tmp_path):
        ds = open_dataset("ade20k-150", root, "val")
        with segmenter(models, tmp_path / "db") as seg:
            seg.add_class("unrelated")
            assert register_classes(seg, ds.classes) == len(ds.classes)
            assert register_classes(seg, ds.classes) == 0
            lut = class_lut(seg, ds.classes)
            assert lut[seg.class_id("unrelated")] == -1 and lut[seg.class_id("water")] == 3


def test_semantic_only_segmentation_skips_panoptic(models, root, tmp_path):
    ds = open_dataset("coco-panoptic", root, "train")
    with segmenter(models, tmp_path / "db") as seg:
        add_dataset(seg, ds.subset([0, 1, 2]))
        full = seg.segment(ds.image(3))
        semantic_only = seg.segment(ds.image(3), panoptic=False)
    np.testing.assert_array_equal(full.semantic, semantic_only.semantic)
    assert semantic_only.segments == [] and not semantic_only.panoptic.any()


class TestSweep:
    def test_held_out_split(self):
        held, rest = split_held_out(10, 0.2, 0)
        assert len(held) == 2 and sorted(held + rest) == list(range(10))
        with pytest.raises(InvalidInputError):
            split_held_out(1, 0.5, 0)

    def test_grid_scores_match_the_segmenter(self, models, root, tmp_path):
        train = open_dataset("ade20k-150", root, "train")
        grid = SweepGrid(k=(3, 10), tau=(0.05,), T=(0.0, 0.9), lam=(0.5, 1.0))
        with segmenter(models, tmp_path / "db") as seg:
            report = run_sweep(seg, train, grid, held_out=0.25, seed=3)
            assert len(report["grid"]) == 16 and report["source"]["dataset"] == "ade20k-150"
            assert {r["config"]["fusion"] for r in report["grid"]} == {"out_of_vocab", "final"}
            # Re-score one grid point by segmenting the held-out images with that config.
            held, _ = split_held_out(len(train), 0.25, 3)
            lut = class_lut(seg, train.classes)
            for row in (report["grid"][1], report["grid"][-1], report["best"]):  # both placements
                cfg = RetrievalConfig(**row["config"])
                with segmenter(models, seg.db, config=cfg) as other:
                    preds = [lut[other.segment(train.image(i)).semantic] for i in held]
                expected = reference_iou(preds, [train.semantic(i) for i in held], len(train.classes), 255)
                assert row["miou"] == pytest.approx(np.nanmean(expected), abs=1e-6)
        assert report["best"]["miou"] == max(r["miou"] for r in report["grid"])


def test_cli_eval_and_add_dataset(models, root, tmp_path):
    env = {**os.environ, "KNNCLIP_CACHE": str(tmp_path / "cache")}

    def knnclip(*args):
        done = subprocess.run(
            [sys.executable, "-m", "knnclip.engine.cli", *args], capture_output=True, text=True, env=env, timeout=600
        )
        return done

    done = knnclip("eval", "semantic", "--dataset", "synthetic", "--models", str(tmp_path / "nowhere"))
    assert done.returncode == 1 and "not a models directory" in done.stderr and "knnclip demo" in done.stderr
    common = ["--root", str(root), "--models", str(models)]
    done = knnclip(
        "db",
        "add-dataset",
        "--dataset",
        "ade20k-150",
        *common,
        "--db",
        str(tmp_path / "db"),
        "--only",
        "sky",
        "water",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["entries"] > 0
    # The database lacks most classes: a clear error, exit 1, unless --register.
    done = knnclip(
        "eval",
        "semantic",
        "--dataset",
        "ade20k-150",
        *common,
        "--db",
        str(tmp_path / "db"),
        "--out",
        str(tmp_path / "out"),
    )
    assert done.returncode == 1 and "--register" in done.stderr
    done = knnclip(
        "eval",
        "semantic",
        "--dataset",
        "ade20k-150",
        *common,
        "--db",
        str(tmp_path / "db"),
        "--register",
        "--out",
        str(tmp_path / "out"),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["database"]["entries"] > 0 and 0 <= report["result"]["miou"] <= 1
    assert len(report["result"]["iou"]) == 8 and "panoptic" not in report["result"]
    out = ["--out", str(tmp_path / "out")]
    done = knnclip("eval", "panoptic", "--dataset", "ade20k-panoptic", *common, *out, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["result"]["panoptic"]["all"]["n"] > 0 and report["database"]["entries"] == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "panoptic-ade20k-panoptic-val.json" in files and "panoptic-ade20k-panoptic-val.md" in files
    assert "semantic-ade20k-150-val.md" in files
    done = knnclip(
        "eval",
        "continual",
        "--dataset",
        "ade20k-150",
        *common,
        "--steps",
        "2",
        "--train-limit",
        "6",
        "--out",
        str(tmp_path / "out"),
        "--name",
        "cont",
    )
    assert done.returncode == 0, done.stderr
    assert "forgetting" in done.stdout and (tmp_path / "out" / "cont.md").is_file()
    assert json.loads((tmp_path / "out" / "cont.json").read_text())["zero_forgetting"] is True
    config = tmp_path / "best.json"
    done = knnclip(
        "eval",
        "sweep",
        "--dataset",
        "ade20k-150",
        *common,
        "--k-values",
        "5",
        "--tau-values",
        "0.05",
        "--T-values",
        "0.5",
        "--lam-values",
        "0.3",
        "0.7",
        "--train-limit",
        "6",
        "--write-config",
        str(config),
        "--out",
        str(tmp_path / "out"),
    )
    assert done.returncode == 0, done.stderr
    cfg = RetrievalConfig.from_file(config)
    assert cfg.k == 5 and cfg.lam in (0.3, 0.7)
    assert json.loads(config.read_text())["source"]["dataset"] == "ade20k-150"
