"""Results made by hand, with every value known: what the renderings of a result are checked on."""

from __future__ import annotations

import numpy as np

from knnclip.engine.pipeline.results import Evidence, InstanceMask, PanopticSegment, Result


def handmade_result(scale: int = 1) -> Result:
    """Two segments and one instance on a 5 x 7 image (each pixel ``scale`` x ``scale``), classes
    with a removed id (2)."""
    semantic = np.zeros((5, 7), np.int32)
    semantic[1:4, 2:6] = 3
    panoptic = np.zeros((5, 7), np.int32)
    panoptic[1:4, 2:6] = 1
    panoptic[0, :] = 2
    semantic, panoptic = (np.kron(a, np.ones((scale, scale), np.int32)) for a in (semantic, panoptic))
    evidence = Evidence("horse", "zebra", 0.8412345678, (("zebra", 0.93), ("horse", 0.5)), True)
    segments = [
        PanopticSegment(1, 3, "zebra", 0.912345678, 12 * scale * scale, True, evidence),
        PanopticSegment(2, 0, "sky", 0.5, 7 * scale * scale, False, Evidence("sky", None, 0.0, (), False)),
    ]
    instance_mask = panoptic == 1
    return Result(
        semantic,
        panoptic,
        segments,
        {0: "sky", 1: "water", 3: "zebra"},
        {"total": 12.34567},
        "photo.png",
        [InstanceMask(3, "zebra", 0.7, instance_mask)],
    )
