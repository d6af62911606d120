"""The segmenter under pressure: the vocabulary changing while images are segmented (one
vocabulary per call), extreme aspect ratios, post-processing memory that does not grow with
queries x pixels, and a failed open that releases the database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import Database


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
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    full_stack_mib = report["queries"] * 3000 * 4000 * 4 / 2**20
    assert report["growth_mib"] < 0.2 * full_stack_mib, report


def test_failed_segmenter_open_releases_the_database(demo_models: Path, tmp_path: Path) -> None:
    from knnclip.engine import Segmenter
    from knnclip.engine.errors import InvalidInputError

    path = tmp_path / "db"
    Database.create(path, 7).close()  # the wrong width for the demo's DINOv2
    with pytest.raises(InvalidInputError, match="7-d embeddings"):
        Segmenter.from_dir(demo_models, path, device="cpu", text_cache=None)
    Database.open(path).close()  # not left locked
