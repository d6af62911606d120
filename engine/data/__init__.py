"""Datasets in their on-disk layouts (``open_dataset``) and their class-name files."""

from knnclip.engine.data.classes import DatasetClass, read_class_file
from knnclip.engine.data.datasets import DATASETS, Dataset, open_dataset

__all__ = ["DATASETS", "Dataset", "DatasetClass", "open_dataset", "read_class_file"]
