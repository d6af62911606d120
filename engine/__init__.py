"""knnclip run time: compiled ops, database, sessions, pipeline and CLI.

Imports NumPy and the compiled module eagerly; FAISS, ONNX Runtime, torch and TensorRT only
where they are used.
"""

from knnclip.engine._version import __version__

__all__ = ["__version__"]
