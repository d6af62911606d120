"""The kNN-CLIP pipeline: :class:`Segmenter` over exported models and a database; its stages
(:mod:`.stages`), the growth of the database (:mod:`.growth`), pre- and post-processing."""

from knnclip.engine.pipeline.results import Evidence, InstanceMask, PanopticSegment, Result
from knnclip.engine.pipeline.segmenter import Segmenter
from knnclip.engine.pipeline.timing import Timer

__all__ = ["Evidence", "InstanceMask", "PanopticSegment", "Result", "Segmenter", "Timer"]
