"""Exception types of knnclip. Each message names the input at fault and the fix."""


class KnnclipError(Exception):
    """Base class of every error knnclip raises on purpose."""


class BuildMismatchError(KnnclipError, ImportError):
    """The compiled module does not belong to the installed Python package (a stale build)."""


class BackendUnavailableError(KnnclipError, ImportError):
    """An optional dependency (torch, TensorRT, onnxruntime-gpu, ...) is not installed."""
