"""Measuring the segmenter: metrics (mIoU, PQ), the semantic/panoptic evaluation, the continual
protocol, the retrieval-settings sweep, reports, and the dataset readers (:mod:`.datasets`)."""
