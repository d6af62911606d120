"""``Client``: the knnclip service from Python (``knnclip segment --server URL`` uses it).

Errors come back as the library's own exception types where the server names one that takes a
message (``InvalidInputError``, ``UnknownClassError``, ...), else as ``ServiceError`` with the
HTTP status and, for 503, ``retry_after``.

>>> with Client("http://127.0.0.1:8080", token="...") as c:         # doctest: +SKIP
...     c.add_class("zebra", thing=True)
...     r = c.segment("photo.jpg")
...     r.semantic.shape, [s.name for s in r.segments]
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine import errors
from knnclip.engine.formats import result_from_record
from knnclip.engine.pipeline.results import Result


@dataclass
class RemoteResult(Result):
    """A ``POST /v1/segment`` reply as the library's :class:`Result` (label maps decoded, segments
    and instances as their dataclasses), with the reply itself as ``record``."""

    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RemoteResult:
        result = result_from_record(record)
        return cls(**{f.name: getattr(result, f.name) for f in fields(Result)}, record=record)


def _quoted(name: str) -> str:
    """A class name as one path segment (a name may hold a slash)."""
    from urllib.parse import quote

    return quote(name, safe="")


def _image_bytes(image: Any) -> bytes:
    """A path, encoded bytes, a PIL image or a uint8 array, as the bytes of an image file."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    kind = type(image).__name__
    raise errors.InvalidInputError(f"an image is a path, bytes, a PIL image or a uint8 array, got {kind}")


class Client:
    """A client of one knnclip server. ``retries`` 503 answers are retried after the server's
    ``Retry-After`` (at most ``max_retry_wait_s`` each); the default is none."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 0,
        max_retry_wait_s: float = 10.0,
    ) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries, self.max_retry_wait_s = retries, max_retry_wait_s

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Requests ----------------------------------------------------------------------------------
    def segment(
        self, image: Any, *, panoptic: bool = True, instance: bool = False, format: str = "json"
    ) -> RemoteResult:
        """Segment one image on the server. ``format`` is how the label maps travel (``json``: RLE,
        ``label-png``); instances come with their masks (``coco-instances``, decoded by pycocotools)."""
        if instance:
            format = "coco-instances"
        params = {"panoptic": str(panoptic).lower(), "instance": str(instance).lower(), "format": format}
        body = _image_bytes(image)
        headers = {"Content-Type": "application/octet-stream"}
        return RemoteResult.from_record(self._call("POST", "/v1/segment", params=params, content=body, headers=headers))

    def classes(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/classes")["classes"]

    def add_class(self, name: str, synonyms: list[str] | tuple[str, ...] = (), *, thing: bool | None = None) -> dict:
        return self._call("POST", "/v1/classes", json={"name": name, "synonyms": list(synonyms), "thing": thing})

    def add_examples(
        self,
        image: Any,
        masks: np.ndarray,
        classes: list[str | None] | dict[int, str],
        *,
        things: dict[str, bool] | None = None,
    ) -> dict[str, Any]:
        """Add the labelled masks of one image: ``masks`` is a label map [H, W] whose value ``v``
        is class ``classes[v]``, or boolean masks [N, H, W] with one name each."""
        masks = np.asarray(masks)
        buf = io.BytesIO()
        arrays = {"masks": masks.astype(bool)} if masks.ndim == 3 else {"labels": masks.astype(np.int32)}
        np.savez_compressed(buf, **arrays)
        names = {str(k): v for k, v in classes.items()} if isinstance(classes, dict) else list(classes)
        files = {
            "image": ("image", _image_bytes(image), "application/octet-stream"),
            "masks": ("masks.npz", buf.getvalue(), "application/octet-stream"),
        }
        data = {"classes": json.dumps(names)}
        if things is not None:
            data["things"] = json.dumps(things)
        return self._call("POST", "/v1/examples", files=files, data=data)

    def remove_class(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/classes/{_quoted(name)}")

    def add_concept(
        self,
        name: str,
        images: list[Any],
        *,
        thing: bool | None = None,
        mask_confidence: float | None = None,
        class_confidence: float | None = None,
    ) -> dict[str, Any]:
        """Add a concept from unlabelled images (paths, bytes, PIL images or uint8 arrays)."""
        files = [
            ("images", (f"image{i}", _image_bytes(image), "application/octet-stream")) for i, image in enumerate(images)
        ]
        fields = {
            "name": name,
            "thing": thing,
            "mask_confidence": mask_confidence,
            "class_confidence": class_confidence,
        }
        data = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in fields.items() if v is not None}
        return self._call("POST", "/v1/concepts", files=files, data=data)

    def entries(
        self, class_name: str | None = None, source: str | None = None, *, page: int = 0, page_size: int = 100
    ) -> dict[str, Any]:
        """One page of the entries with where each came from (``more``: another page follows)."""
        params: dict[str, str | int] = {"page": page, "page_size": page_size}
        params |= {k: v for k, v in (("class", class_name), ("source", source)) if v is not None}
        return self._call("GET", "/v1/entries", params=params)

    def remove_source(self, source: str) -> dict[str, Any]:
        """Delete every entry added from ``source``."""
        return self._call("DELETE", f"/v1/sources/{_quoted(source)}")

    def remove_entry(self, entry_id: int) -> dict[str, Any]:
        """Delete one entry (an id ``add_examples`` returned)."""
        return self._call("DELETE", f"/v1/entries/{int(entry_id)}")

    def rename_class(self, name: str, new_name: str) -> dict[str, Any]:
        return self._call("PATCH", f"/v1/classes/{_quoted(name)}", json={"name": new_name})

    def merge_classes(self, source: str, target: str) -> dict[str, Any]:
        """Move ``source``'s entries and names into ``target``; ``source`` is removed."""
        return self._call("PATCH", f"/v1/classes/{_quoted(source)}", json={"merge_into": target})

    def snapshot(self) -> dict[str, Any]:
        return self._call("POST", "/v1/snapshot")

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until ``/readyz`` says ready (or raise ServiceError with the server's reason)."""
        import httpx

        end = time.monotonic() + timeout
        while True:
            try:
                response = self._http.get("/readyz")
                if response.status_code == 200:
                    return
                body = response.json() if response.headers.get("content-type") == "application/json" else {}
                if body.get("status") == "failed":
                    raise errors.ServiceError(503, "LoadError", body.get("error") or "the server failed to load")
            except (httpx.TransportError, ValueError):  # not listening yet; a proxy's own answer
                pass
            if time.monotonic() > end:
                raise errors.ServiceError(503, "NotReady", f"the server was not ready within {timeout:g} s")
            time.sleep(0.1)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        for attempt in range(self.retries + 1):
            response = self._http.request(method, path, **kw)
            if response.status_code == 503 and attempt < self.retries:
                wait = float(response.headers.get("Retry-After", "1"))
                time.sleep(min(wait, self.max_retry_wait_s))
                continue
            break
        if response.status_code < 400:
            return response.json()
        raise _error(response)


_MESSAGE_ONLY = {
    name: getattr(errors, name)
    for name in (
        "InvalidInputError",
        "UnknownClassError",
        "UnknownEntryError",
        "OutOfMemoryError",
        "InferenceError",
        "ReadOnlyDatabaseError",
        "DatabaseLockedError",
        "DatasetError",
        "BackendUnavailableError",
    )
}


def _error(response: Any) -> Exception:
    try:
        body = response.json()
        detail = body["error"]
        kind, message = str(detail["type"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        kind, message = "HTTPError", response.text[:500] or response.reason_phrase
        if response.status_code == 422:
            kind = "ValidationError"
    retry = response.headers.get("Retry-After")
    if kind in _MESSAGE_ONLY and response.status_code < 500:
        return _MESSAGE_ONLY[kind](message)
    return errors.ServiceError(response.status_code, kind, message, float(retry) if retry else None)
