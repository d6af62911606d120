"""Datasets in their on-disk layouts (``open_dataset``) and their class-name files."""

from knnclip.engine.eval.datasets.classes import DatasetClass, read_class_file
from knnclip.engine.eval.datasets.readers import DATASETS, Dataset, open_dataset

__all__ = ["DATASETS", "Dataset", "DatasetClass", "open_dataset", "read_class_file"]
