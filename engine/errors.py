"""Exception types of knnclip. Each message names the input at fault and the fix."""

import errno
import os


class KnnclipError(Exception):
    """Base class of every error knnclip raises on purpose."""


class BuildMismatchError(KnnclipError, ImportError):
    """The compiled module does not belong to the installed Python package (a stale build)."""


class BackendUnavailableError(KnnclipError, ImportError):
    """An optional dependency (torch, TensorRT, onnxruntime-gpu, ...) is not installed."""


# The extra that brings each optional top-level module (pyproject.toml's optional dependencies).
EXTRA_OF_MODULE = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "httpx": "serve",
    "pydantic": "serve",
    "starlette": "serve",
    "ray": "ray",
    "av": "video",
    "pycocotools": "video",
    "openvino": "openvino",
    "torch": "export",
    "onnx": "export",
    "tensorrt": "tensorrt",
    "pycuda": "tensorrt",
    "matplotlib": "plots",
    "huggingface_hub": "hub",
    "onnxruntime": "cpu",
    "faiss": "cpu",  # or 'gpu' on an NVIDIA machine (needs_extra says so)
}
RUNTIME_EXTRAS = ("cpu", "gpu")  # the same modules in their CPU and GPU builds


def needs_extra(feature: str, extra: str) -> BackendUnavailableError:
    """The error for ``feature`` when the optional dependencies of ``extra`` are missing."""
    if extra in RUNTIME_EXTRAS:
        return BackendUnavailableError(
            f'{feature} needs ONNX Runtime and faiss: pip install ".[cpu]" in knnclip\'s source folder '
            '(or ".[gpu]" on an NVIDIA machine)'
        )
    return BackendUnavailableError(
        f"{feature} needs the '{extra}' extra: pip install \".[{extra}]\" in knnclip's source folder"
    )


def missing_module_error(exc: ImportError, feature: str = "this command") -> BackendUnavailableError | None:
    """The :func:`needs_extra` error for a failed import of an optional module, or None when the
    module belongs to no extra (a broken installation, to be reported as it is)."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(name)
    return None if extra is None else needs_extra(f"{feature} ({name} is not installed)", extra)


class UsageError(KnnclipError, ValueError):
    """The command line is incomplete or contradicts itself (exit code 2)."""


class InvalidInputError(KnnclipError, ValueError):
    """An argument has the wrong shape, dtype or values (NaN, Inf, a zero vector where a direction is needed)."""


class CheckpointError(KnnclipError, ValueError):
    """A model checkpoint is unreadable, of another architecture, or has missing, unexpected or
    mis-shaped tensors (the message lists them)."""


class ModelFileError(KnnclipError, FileNotFoundError):
    """A file a model needs (tokenizer vocabulary, weights) is missing or unreadable."""


class ModelDownloadError(KnnclipError, OSError):
    """Weights could not be downloaded (offline, unknown repository, no access)."""


class OutOfMemoryError(KnnclipError, MemoryError):
    """One input needed more memory than the machine had; the others are unaffected. The message
    names the input and its size."""


class InferenceError(KnnclipError, RuntimeError):
    """A model runtime (ONNX Runtime, TensorRT, OpenVINO, torch, CUDA) failed on one input with an
    error of its own; the others are unaffected. The message names the runtime's error."""


class ArtifactCorruptError(KnnclipError):
    """An exported artefact (ONNX model, engine) is damaged, incomplete, stale or of another kind.

    ``path`` names the file. Re-export the artefact to fix it.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


class ArtifactExistsError(KnnclipError, FileExistsError):
    """An export was pointed at an artefact directory that already exists (pass overwrite)."""


class UnknownClassError(KnnclipError, KeyError):
    """A class name or id that the vocabulary does not hold."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class UnknownEntryError(KnnclipError, KeyError):
    """An entry id that the database does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DatabaseError(KnnclipError):
    """Base class of the errors of knnclip.engine.Database."""


class DatabaseCorruptError(DatabaseError):
    """A database file is damaged, truncated, of another version or not a knnclip file at all.

    ``path`` names the file. Nothing is repaired or overwritten automatically.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


class DatabaseExistsError(DatabaseError, FileExistsError):
    """Database.create was pointed at a path that already exists."""


class DatabaseLockedError(DatabaseError):
    """Another writer holds the database (one writer at a time; open it read_only=True to share)."""


class DatabaseBusyError(DatabaseError):
    """A read-only open kept losing the race against a writer's checkpoints; nothing is damaged."""


class ReadOnlyDatabaseError(DatabaseError):
    """A change was asked of a database opened read-only (or already closed)."""


class DatabaseWriteError(DatabaseError, OSError):
    """Writing to the database's directory failed (disk full, I/O error, a read-only file system,
    FAISS unable to write its index). The message names the file and the cause and says whether
    anything changed: after this error the database in memory equals the database on disk."""

    def __init__(self, path: object, action: str, cause: BaseException, changed: str = "nothing was changed") -> None:
        self.path = str(path)
        self.cause = cause
        errno_ = getattr(cause, "errno", None)
        reason = os.strerror(errno_) if isinstance(errno_, int) else str(cause)
        fix = FIXES.get(errno_, "fix the cause and retry") if isinstance(errno_, int) else "fix the cause and retry"
        super().__init__(f"{self.path}: could not {action} ({reason}); {changed}; {fix}")
        self.errno = errno_


FIXES = {
    errno.ENOSPC: "free disk space and retry",
    errno.EDQUOT: "free space within the disk quota and retry",
    errno.EROFS: "the file system is read-only: open the database with read_only=True, or remount it writable",
    errno.EACCES: "check the permissions of the database directory",
    errno.EPERM: "check the permissions of the database directory",
    errno.EIO: "the disk reported an I/O error: check it, then retry",
}


class DatabaseNotTrainedError(DatabaseError):
    """The index needs training (IVF, PQ, 8-bit storage) before the first add."""


class DatasetError(KnnclipError, ValueError):
    """A dataset directory lacks files, pairs images and annotations wrongly, or holds a malformed
    annotation or class-name file (the message names the file and the layout expected)."""


class ServiceError(KnnclipError):
    """A knnclip server refused or failed a request (``knnclip.engine.serve.client``).

    ``status`` is the HTTP status, ``kind`` the server's error type, ``retry_after`` the seconds
    the server asked to wait (503), or None.
    """

    def __init__(self, status: int, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{kind} ({status}): {message}")
        self.status, self.kind, self.message, self.retry_after = status, kind, message, retry_after
