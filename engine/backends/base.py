"""The one interface every backend implements: named inputs in, named outputs out, checked.

A :class:`Session` knows its inputs and outputs from the artefact's manifest (names, dtypes,
shapes with symbolic axes such as ``"batch"``). :meth:`Session.infer` validates a feed against
them before anything runs, so a wrong name, dtype or shape is a clear error rather than a crash
deep inside a runtime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.artifact import Manifest, TensorEntry
from knnclip.engine.errors import BackendUnavailableError, InvalidInputError

Dim = int | str  # a fixed size, or the name of a dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    @classmethod
    def from_manifest(cls, entry: TensorEntry) -> TensorSpec:
        return cls(entry.name, np.dtype(entry.dtype), entry.shape)

    def check(self, array: Any, owner: str) -> None:
        """Raise ``InvalidInputError`` unless ``array`` has this dtype and a matching shape
        (symbolic axes take any positive size, consistently within one array)."""
        dtype = getattr(array, "dtype", None)
        shape = tuple(getattr(array, "shape", ()))
        if dtype is None or np.dtype(str(dtype).removeprefix("torch.")) != self.dtype:
            raise InvalidInputError(f"{owner}: input {self.name!r} must be {self.dtype}, got {dtype}")
        if len(shape) != len(self.shape) or any(
            (isinstance(want, int) and got != want) or got <= 0 for got, want in zip(shape, self.shape, strict=False)
        ):
            raise InvalidInputError(
                f"{owner}: input {self.name!r} must have shape {list(self.shape)} (named axes take any size), "
                f"got {list(shape)}"
            )


class Session(ABC):
    """A model ready to run. Subclasses implement :meth:`_run` (and :meth:`close` if they hold
    resources); :meth:`infer` checks the feed first."""

    backend: str = "?"
    selection: str | None = None  # why ``backend="auto"`` opened this one, where it measured

    def __init__(self, directory: Path, manifest: Manifest, device: str) -> None:
        self.directory = directory
        self.manifest = manifest
        self.device = device
        self.inputs = tuple(TensorSpec.from_manifest(e) for e in manifest.inputs)
        self.outputs = tuple(TensorSpec.from_manifest(e) for e in manifest.outputs)

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def validate(self, feed: Mapping[str, Any]) -> None:
        names = {spec.name for spec in self.inputs}
        unknown = sorted(set(feed) - names)
        missing = sorted(names - set(feed))
        if unknown or missing:
            raise InvalidInputError(
                f"{self}: inputs are {sorted(names)}; "
                + "; ".join(
                    p for p in (f"unknown {unknown}" if unknown else "", f"missing {missing}" if missing else "") if p
                )
            )
        for spec in self.inputs:
            spec.check(feed[spec.name], str(self))

    def infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """Run the model on ``feed`` (name -> array) and return name -> array for every output."""
        self.validate(feed)
        return self._run(feed)

    @abstractmethod
    def _run(self, feed: Mapping[str, Any]) -> dict[str, Any]: ...

    @property
    def device_outputs(self) -> bool:
        """Whether :meth:`infer_device` leaves the outputs on a CUDA device."""
        return False

    def infer_device(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """Run the model on inputs on its device (CUDA arrays through ``__cuda_array_interface__``
        or DLPack; host NumPy arrays are copied in) and leave the outputs there: each exposes
        ``__cuda_array_interface__`` or DLPack (torch tensors, or a
        :class:`~knnclip.engine.backends.device_buffer.DeviceBuffer`), ready when this returns.
        Backends without device outputs raise ``BackendUnavailableError``."""
        raise BackendUnavailableError(f"{self}: the {self.backend} backend has no device outputs")

    def close(self) -> None:  # noqa: B027 - optional for backends that hold nothing
        """Release what the session holds; the session cannot run afterwards."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind}, backend={self.backend}, device={self.device}, {self.directory})"
