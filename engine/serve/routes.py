"""The HTTP routes (docs/serving.md), at module level: each reads what it needs from its
application's state (``request.app.state``: the service, the token check, the limits, the
metrics) that :func:`knnclip.engine.serve.app.create_app` set."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from knnclip.engine.errors import InvalidInputError
from knnclip.engine.serve import encoding
from knnclip.engine.serve.middleware import BodyTimeout, PayloadTooLarge
from knnclip.engine.serve.service import NotReady, SegmentRequest

# Module level: FastAPI (and Ray Serve's ingress, which re-reads the routes) resolve annotations
# in the module's namespace.
Credentials = Annotated[
    HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False, description="the token of --token-file"))
]
# formats.REPLY_FORMATS, and the first version's names for two of them (formats.FORMAT_ALIASES).
ReplyFormat = Literal["json", "label-png", "coco-instances", "png", "coco"]

_BINARY = {"type": "string", "format": "binary"}
_IMAGE_TYPES = {
    "application/octet-stream": {"schema": _BINARY},
    "image/*": {"schema": _BINARY},
    "multipart/form-data": {
        "schema": {"type": "object", "required": ["image"], "properties": {"image": _BINARY}},
    },
}
_EXAMPLE_FORM = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["image", "masks", "classes"],
            "properties": {
                "image": {**_BINARY, "description": "the image"},
                "masks": {
                    **_BINARY,
                    "description": "a PNG of class indices, or an .npz of 'masks' [N, H, W] or 'labels' [H, W]",
                },
                "classes": {"type": "string", "description": "JSON: the name of each index (list or object)"},
                "things": {"type": "string", "description": "JSON object: class name -> is a thing"},
            },
        }
    }
}


MAX_CONCEPT_IMAGES = 16  # per request: each is segmented while the writer waits
_CONCEPT_FORM = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["name", "images"],
            "properties": {
                "name": {"type": "string", "description": "the concept's name ('name,synonym' allowed)"},
                "images": {"type": "array", "items": _BINARY, "maxItems": MAX_CONCEPT_IMAGES},
                "thing": {"type": "string", "enum": ["true", "false"]},
                "mask_confidence": {"type": "string", "description": "0..1 (default: the server's config)"},
                "class_confidence": {"type": "string", "description": "0..1 (default: the server's config)"},
            },
        }
    }
}


def _header(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return f"{credentials.scheme} {credentials.credentials}" if credentials else None


def read_access(request: Request, credentials: Credentials) -> None:
    request.app.state.auth.check(_header(credentials), mutation=False)


def write_access(request: Request, credentials: Credentials) -> None:
    request.app.state.auth.check(_header(credentials), mutation=True)


class Service(Protocol):
    """What the routes need of the engine behind them (``LocalService``, ``ray_app.RayService``)."""

    @property
    def ready(self) -> bool: ...
    @property
    def load_error(self) -> BaseException | None: ...
    def queue_depth(self) -> int: ...
    def entries(self) -> int: ...
    def stale_replicas(self) -> list[str]: ...
    async def segment(self, request: SegmentRequest) -> dict[str, Any]: ...
    async def classes(self) -> list[dict[str, Any]]: ...
    async def add_class(self, name: str, synonyms: Sequence[str], thing: bool | None) -> dict[str, Any]: ...
    async def add_examples(
        self, image: bytes, masks: np.ndarray, names: list[str], things: dict[str, bool] | None
    ) -> dict[str, Any]: ...
    async def remove_class(self, name: str) -> dict[str, Any]: ...
    async def remove_entry(self, entry_id: int) -> dict[str, Any]: ...
    async def entry_page(self, class_name: str | None, source: str | None, page: int, size: int) -> dict[str, Any]: ...
    async def remove_source(self, source: str) -> dict[str, Any]: ...
    async def add_concept(
        self, name: str, images: list[bytes], thing: bool | None, confidences: dict[str, float | None]
    ) -> dict[str, Any]: ...
    async def edit_class(self, name: str, new_name: str | None, merge_into: str | None) -> dict[str, Any]: ...
    async def snapshot(self) -> dict[str, Any]: ...


_ATTACHED: dict[str, Service] = {}


def attach_service(app: Any, service: Service) -> None:
    """Give ``app`` (or a copy of it, as Ray Serve's ingress makes) its service later: the
    copies share ``app.state.service_key``, and this process's registry holds the service."""
    _ATTACHED[app.state.service_key] = service


def service_of(app: Any) -> Service | None:
    return app.state.service or _ATTACHED.get(app.state.service_key)


def service(request: Request) -> Service:
    """The application's service, or 503 while it has none."""
    current = service_of(request.app)
    if current is None:
        raise NotReady("the service is starting")
    return current


class ClassEdit(BaseModel):
    """The body of ``PATCH /v1/classes/{name}``: a new name, or the class to merge into."""

    name: str | None = Field(None, min_length=1, max_length=256, description="rename the class (its id is kept)")
    merge_into: str | None = Field(
        None, min_length=1, max_length=256, description="move its entries and names into this class and remove it"
    )


class NewClass(BaseModel):
    """The body of ``POST /v1/classes``."""

    name: str = Field(min_length=1, max_length=256, description="the class name ('name,synonym' allowed)")
    synonyms: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=63)
    thing: bool | None = Field(None, description="a countable object (true) or stuff (false)")


router = APIRouter()
reads, writes = [Depends(read_access)], [Depends(write_access)]


# Health ------------------------------------------------------------------------------------------
@router.get("/healthz", dependencies=reads, tags=["health"])
async def healthz() -> dict[str, str]:
    """The process is alive (it answers while models load)."""
    return {"status": "alive"}


@router.get(
    "/readyz",
    dependencies=reads,
    tags=["health"],
    responses={503: {"description": "loading, failed to load, or draining"}},
)
async def readyz(request: Request) -> Any:
    """Models loaded and the database open; ``stale`` names the replicas serving their last state
    while the database's owner cannot be reached."""
    current = service_of(request.app)
    if current is not None and current.ready:
        return {"status": "ready", "entries": current.entries(), "stale": current.stale_replicas()}
    problem = current.load_error if current is not None else None
    body = {"status": "failed" if problem else "loading", "error": str(problem) if problem else None}
    return JSONResponse(body, 503, headers={"Retry-After": "5"})


@router.get(
    "/metrics",
    dependencies=reads,
    tags=["health"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def prometheus(request: Request) -> Any:
    """Prometheus metrics."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


# Segmentation ------------------------------------------------------------------------------------
@router.post(
    "/v1/segment",
    dependencies=reads,
    tags=["segment"],
    openapi_extra={"requestBody": {"required": True, "content": _IMAGE_TYPES}},
)
async def segment(
    request: Request,
    panoptic: Annotated[bool, Query(description="run the panoptic inference")] = True,
    instance: Annotated[bool, Query(description="run FC-CLIP's instance inference")] = False,
    format: Annotated[ReplyFormat, Query(description="how label maps (and masks) are encoded")] = "json",
) -> Any:
    """Segment one image: the body is the image file, or multipart/form-data with a part `image`."""
    data = await _image_bytes(request, "image")
    await asyncio.to_thread(encoding.image_size, data, request.app.state.max_pixels)  # headers can be costly
    payload = await service(request).segment(SegmentRequest(data, panoptic, instance, format))
    request.app.state.metrics.observe_stages(payload.get("timings", {}))
    return payload


# Vocabulary --------------------------------------------------------------------------------------
@router.get("/v1/classes", dependencies=reads, tags=["vocabulary"])
async def get_classes(request: Request) -> dict[str, Any]:
    """Every class: id, name, synonyms, thing, number of examples."""
    return {"classes": await service(request).classes()}


@router.post("/v1/classes", dependencies=writes, tags=["vocabulary"], status_code=201)
async def post_class(request: Request, body: NewClass) -> dict[str, Any]:
    """Add a class by name (classified from its text embedding alone), or synonyms to one."""
    return await service(request).add_class(body.name, body.synonyms, body.thing)


@router.delete("/v1/classes/{name:path}", dependencies=writes, tags=["vocabulary"])
async def delete_class(request: Request, name: str) -> dict[str, Any]:
    """Delete a class and its examples."""
    return await service(request).remove_class(name)


@router.patch("/v1/classes/{name:path}", dependencies=writes, tags=["vocabulary"])
async def patch_class(request: Request, name: str, body: ClassEdit) -> dict[str, Any]:
    """Rename a class (`{"name": ...}`: its id and entries are kept) or merge it into another
    (`{"merge_into": ...}`: its entries and names move there, and it is removed)."""
    return await service(request).edit_class(name, body.name, body.merge_into)


@router.get("/v1/entries", dependencies=reads, tags=["vocabulary"])
async def get_entries(
    request: Request,
    class_name: Annotated[str | None, Query(alias="class", max_length=256, description="only this class")] = None,
    source: Annotated[str | None, Query(max_length=1024, description="only entries added from this source")] = None,
    page: Annotated[int, Query(ge=0, description="page number, from 0")] = 0,
    page_size: Annotated[int, Query(ge=1, le=1000, description="entries per page")] = 100,
) -> dict[str, Any]:
    """The entries with where each came from: id, class, source, mask index, time added."""
    return await service(request).entry_page(class_name, source, page, page_size)


@router.delete("/v1/sources/{source:path}", dependencies=writes, tags=["vocabulary"])
async def delete_source(request: Request, source: str) -> dict[str, Any]:
    """Delete every entry added from one source (an image's file name or digest, an upload)."""
    return await service(request).remove_source(source)


@router.delete("/v1/entries/{entry_id}", dependencies=writes, tags=["vocabulary"])
async def delete_entry(request: Request, entry_id: int) -> dict[str, Any]:
    """Delete one database entry (the ids `POST /v1/examples` returned); every other entry is untouched."""
    return await service(request).remove_entry(entry_id)


@router.post(
    "/v1/concepts",
    dependencies=writes,
    tags=["vocabulary"],
    status_code=201,
    openapi_extra={"requestBody": {"required": True, "content": _CONCEPT_FORM}},
)
async def post_concept(request: Request) -> dict[str, Any]:
    """Add a concept from unlabelled images: every mask FC-CLIP proposes in them that is confident
    enough (mask and class) is added under the concept's name."""
    form = await _form(request, max_files=MAX_CONCEPT_IMAGES)
    name = _field(form, "name")
    if not name:
        raise InvalidInputError("the multipart body needs a text field 'name'")
    parts = form.getlist("images")
    if not parts or any(isinstance(p, str) for p in parts):
        raise InvalidInputError("the multipart body needs one or more file parts 'images'")
    images = [await p.read() for p in parts]
    for data in images:
        await asyncio.to_thread(encoding.image_size, data, request.app.state.max_pixels)
    thing = _field(form, "thing")
    if thing not in (None, "true", "false"):
        raise InvalidInputError("'thing' is true or false")
    confidences = {key: _fraction(form, key) for key in ("mask_confidence", "class_confidence")}
    return await service(request).add_concept(name, images, None if thing is None else thing == "true", confidences)


def _fraction(form: Any, name: str) -> float | None:
    text = _field(form, name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InvalidInputError(f"{name!r} is a number from 0 to 1, got {text[:20]!r}") from None
    if not 0.0 <= value <= 1.0:
        raise InvalidInputError(f"{name!r} is a number from 0 to 1, got {value}")
    return value


@router.post(
    "/v1/examples",
    dependencies=writes,
    tags=["vocabulary"],
    status_code=201,
    openapi_extra={"requestBody": {"required": True, "content": _EXAMPLE_FORM}},
)
async def post_examples(request: Request) -> dict[str, Any]:
    """Add labelled examples: an image, its masks and the names of the masks' values."""
    form = await _form(request)
    image = await _part(form, "image")
    masks = await _part(form, "masks")
    size = await asyncio.to_thread(encoding.image_size, image, request.app.state.max_pixels)
    names = encoding.parse_names(_field(form, "classes"), "classes")
    things = encoding.parse_names(_field(form, "things"), "things")
    if things is not None and not (isinstance(things, dict) and all(isinstance(v, bool) for v in things.values())):
        raise InvalidInputError("'things' must be a JSON object of class name -> true/false")
    filename = getattr(form.get("masks"), "filename", "") or ""
    masks_array, labels = await asyncio.to_thread(encoding.example_masks, masks, filename, names, size)
    return await service(request).add_examples(image, masks_array, labels, things)


@router.post("/v1/snapshot", dependencies=writes, tags=["vocabulary"])
async def snapshot(request: Request) -> dict[str, Any]:
    """Checkpoint the database (and copy it into --snapshot-dir when configured)."""
    return await service(request).snapshot()


# Bodies ------------------------------------------------------------------------------------------
async def _form(request: Any, max_files: int = 4) -> Any:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInputError("this endpoint takes multipart/form-data")
    try:
        return await request.form(max_files=max_files, max_fields=8, max_part_size=1 << 20)
    except (PayloadTooLarge, BodyTimeout):  # the guard's own: 413 / 408, not a malformed body
        raise
    except Exception as exc:  # noqa: BLE001 - starlette's MultiPartException and the parser's own errors
        raise InvalidInputError(f"the multipart body is malformed ({exc})") from None


async def _part(form: Any, name: str) -> bytes:
    part = form.get(name)
    if part is None or isinstance(part, str):
        raise InvalidInputError(f"the multipart body needs a file part {name!r}")
    data = await part.read()
    if not data:
        raise InvalidInputError(f"the part {name!r} is empty")
    return data


def _field(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidInputError(f"the part {name!r} must be a text field")
    return value


async def _image_bytes(request: Any, part: str) -> bytes:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await _part(await _form(request), part)
    data = await request.body()
    if not data:
        raise InvalidInputError("the request body is empty: send the image's bytes, or multipart with a part 'image'")
    return data
