"""The HTTP application (FastAPI), the same for the embedded server and Ray Serve.

Routes call a :class:`Service` (``LocalService`` in one process, ``ray_app.RayService`` over Ray
deployments): ``app.state.service``, or the one :func:`attach_service` registered. Limits come before work: a body over
``max_body_bytes`` is refused before it is read (``RequestGuard``, which also checks the token of a
change before any body is read and gives a body ``body_timeout_s`` to arrive), an image over ``max_pixels``
before it is decoded, a full queue at once (503 + ``Retry-After``). Library errors keep their type
in the reply (``{"error": {"type", "message", "status"}}``, docs/serving.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from knnclip.engine.errors import InvalidInputError, KnnclipError, ServiceError
from knnclip.engine.serve import encoding
from knnclip.engine.serve.auth import AuthError, TokenAuth
from knnclip.engine.serve.batcher import DeadlineExceeded, Overloaded, ShuttingDown
from knnclip.engine.serve.docs_ui import install_docs
from knnclip.engine.serve.metrics import ServiceMetrics
from knnclip.engine.serve.service import NotReady, SegmentRequest

log = logging.getLogger("knnclip.serve")

API_VERSION = "1"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_POSTS = frozenset({"/v1/segment"})  # a POST that changes nothing
_IMAGE_TYPES = {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"}},
        },  # fmt: skip
    },
}
_EXAMPLE_FORM = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["image", "masks", "classes"],
            "properties": {
                "image": {"type": "string", "format": "binary", "description": "the image"},
                "masks": {
                    "type": "string",
                    "format": "binary",
                    "description": "a PNG of class indices, or an .npz of 'masks' [N, H, W] or 'labels' [H, W]",
                },
                "classes": {"type": "string", "description": "JSON: the name of each index (list or object)"},
                "things": {"type": "string", "description": "JSON object: class name -> is a thing"},
            },
        }  # fmt: skip
    }
}


class Service(Protocol):
    """What the routes need of the engine behind them."""

    @property
    def ready(self) -> bool: ...
    @property
    def load_error(self) -> BaseException | None: ...
    def queue_depth(self) -> int: ...
    def entries(self) -> int: ...
    async def segment(self, request: SegmentRequest) -> dict[str, Any]: ...
    async def classes(self) -> list[dict[str, Any]]: ...
    async def add_class(self, name: str, synonyms: Sequence[str], thing: bool | None) -> dict[str, Any]: ...
    async def add_examples(
        self, image: bytes, masks: np.ndarray, names: list[str], things: dict[str, bool] | None
    ) -> dict[str, Any]: ...
    async def remove_class(self, name: str) -> dict[str, Any]: ...
    async def snapshot(self) -> dict[str, Any]: ...


# Module level: FastAPI (and Ray Serve's ingress, which re-reads the routes) resolve annotations
# in the module's namespace.
Credentials = Annotated[
    HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False, description="the token of --token-file"))
]


_ATTACHED: dict[str, Service] = {}


def attach_service(app: Any, service: Service) -> None:
    """Give ``app`` (or a copy of it, as Ray Serve's ingress makes) its service later: the
    copies share ``app.state.service_key``, and this process's registry holds the service."""
    _ATTACHED[app.state.service_key] = service


def service_of(app: Any) -> Service | None:
    return app.state.service or _ATTACHED.get(app.state.service_key)


class NewClass(BaseModel):
    """The body of ``POST /v1/classes``."""

    name: str = Field(min_length=1, max_length=256, description="the class name ('name,synonym' allowed)")
    synonyms: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=63)
    thing: bool | None = Field(None, description="a countable object (true) or stuff (false)")


class PayloadTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class RequestGuard:
    """ASGI middleware, outermost, before anything reads the body: the token of a change (or of a
    read with ``--auth-reads``) is checked from the headers alone (401/403: a 16 MiB JSON body
    without a token is never parsed); a body over ``limit`` bytes gets 413, by its Content-Length
    before reading or while reading a chunked one; a body that has not arrived within
    ``body_timeout`` seconds of the request gets 408 and the connection is closed (a client
    trickling bytes holds a connection for ever otherwise)."""

    def __init__(self, app: Any, auth: TokenAuth, limit: int, body_timeout: float) -> None:
        self.app, self.auth, self.limit, self.body_timeout = app, auth, limit, body_timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        mutation = scope["method"] not in READ_METHODS and scope["path"] not in READ_POSTS
        try:
            self.auth.check(headers.get(b"authorization", b"").decode("latin-1") or None, mutation=mutation)
        except AuthError as exc:
            # Answered from the headers; an unread body cannot be skipped, so the connection closes.
            extra = [(b"connection", b"close")] + ([(b"www-authenticate", b"Bearer")] if exc.status == 401 else [])
            return await _send_json(send, exc.status, encoding.error_body(exc, exc.status), extra)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, _too_large(self.limit), [(b"connection", b"close")])
        seen = 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout

        async def guarded() -> dict:
            nonlocal seen
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.001))
            except asyncio.TimeoutError:
                raise BodyTimeout from None
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise PayloadTooLarge
            return message

        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded, tracking_send)
        except PayloadTooLarge:
            if not started:
                await _send_json(send, 413, _too_large(self.limit), [(b"connection", b"close")])
        except BodyTimeout:
            if not started:
                await _send_json(send, 408, _body_timeout(self.body_timeout), [(b"connection", b"close")])


class RequestMetrics:
    """ASGI middleware: requests by route and status, and their latency."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        self.metrics.in_flight.inc()

        async def recording_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            # A method name is the client's to choose: label only the standard ones (bounded series).
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def _too_large(limit: int) -> dict[str, Any]:
    message = f"the request body is larger than this server's limit of {limit} bytes"
    return {"error": {"type": "PayloadTooLarge", "message": message, "status": 413}}


def _body_timeout(seconds: float) -> dict[str, Any]:
    message = f"the request body did not arrive within this server's {seconds:g} s"
    return {"error": {"type": "BodyTimeout", "message": message, "status": 408}}


async def _send_json(
    send: Callable, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    import json

    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def create_app(
    service: Service | None,
    *,
    auth: TokenAuth,
    max_body_bytes: int,
    max_pixels: int,
    lifespan: Callable[[Any], Any] | None = None,
    body_timeout_s: float = 30.0,
) -> Any:
    """The FastAPI application over ``service`` (or over the one :func:`attach_service` gives it
    later, as the Ray ingress does); ``lifespan(app)`` is an async context manager factory run
    around the server's life."""
    from knnclip.engine import __version__

    @asynccontextmanager
    async def no_lifespan(app: Any) -> Any:
        yield

    app = FastAPI(
        title="knnclip", version=__version__, lifespan=lifespan or no_lifespan, docs_url=None, redoc_url=None,
        description="Open-vocabulary segmentation with a growing database (kNN-CLIP). docs/serving.md is the contract.",
    )  # fmt: skip
    app.state.service = service
    app.state.service_key = uuid.uuid4().hex

    def svc(request: Request) -> Service:
        current = service_of(request.app)
        if current is None:
            raise NotReady("the service is starting")
        return current

    metrics = ServiceMetrics(
        lambda: float(current.queue_depth()) if (current := service_of(app)) else 0.0,
        lambda: float(current.entries()) if (current := service_of(app)) else 0.0,
    )
    app.state.metrics = metrics

    def header(credentials: HTTPAuthorizationCredentials | None) -> str | None:
        return f"{credentials.scheme} {credentials.credentials}" if credentials else None

    def read_access(credentials: Credentials) -> None:
        auth.check(header(credentials), mutation=False)

    def write_access(credentials: Credentials) -> None:
        auth.check(header(credentials), mutation=True)

    # Errors ------------------------------------------------------------------------------------
    def error(status: int, exc: BaseException, headers: dict[str, str] | None = None) -> Any:
        return JSONResponse(encoding.error_body(exc, status), status, headers=headers)

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError) -> Any:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error(exc.status, exc, headers)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> Any:
        return error(503, exc, {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(NotReady)
    @app.exception_handler(ShuttingDown)
    async def _unavailable(request: Request, exc: Exception) -> Any:
        metrics.rejections.labels("unavailable").inc()
        return error(503, exc, {"Retry-After": "5"})

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(request: Request, exc: DeadlineExceeded) -> Any:
        metrics.rejections.labels("deadline").inc()
        return error(504, exc)

    @app.exception_handler(ServiceError)
    async def _remote(request: Request, exc: ServiceError) -> Any:
        """An error a Ray replica reported, passed on as it was."""
        body = {"error": {"type": exc.kind, "message": exc.message, "status": exc.status}}
        return JSONResponse(body, exc.status)

    @app.exception_handler(KnnclipError)
    async def _library(request: Request, exc: KnnclipError) -> Any:
        status = encoding.error_status(exc)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return error(status, exc)

    @app.exception_handler(BodyTimeout)
    async def _slow_body(request: Request, exc: BodyTimeout) -> Any:
        metrics.rejections.labels("body_timeout").inc()
        return JSONResponse(_body_timeout(body_timeout_s), 408, headers={"Connection": "close"})

    @app.exception_handler(PayloadTooLarge)
    async def _too_large_body(request: Request, exc: PayloadTooLarge) -> Any:
        return JSONResponse(_too_large(max_body_bytes), 413)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Any:
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, RuntimeError("internal error; the server's log has the details"))

    install_docs(app, [Depends(read_access)])  # /docs without a CDN (edge servers are often air-gapped)

    # Health ------------------------------------------------------------------------------------
    @app.get("/healthz", dependencies=[Depends(read_access)], tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive (it answers while models load)."""
        return {"status": "alive"}

    @app.get("/readyz", dependencies=[Depends(read_access)], tags=["health"],
             responses={503: {"description": "loading, failed to load, or draining"}})  # fmt: skip
    async def readyz(request: Request) -> Any:
        """Models loaded and the database open."""
        current = service_of(request.app)
        if current is not None and current.ready:
            return {"status": "ready", "entries": current.entries()}
        problem = current.load_error if current is not None else None
        body = {"status": "failed" if problem else "loading", "error": str(problem) if problem else None}
        return JSONResponse(body, 503, headers={"Retry-After": "5"})

    @app.get("/metrics", dependencies=[Depends(read_access)], tags=["health"],
             response_class=Response, responses={200: {"content": {"text/plain": {}}}})  # fmt: skip
    async def prometheus() -> Any:
        """Prometheus metrics."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # Segmentation ------------------------------------------------------------------------------
    @app.post("/v1/segment", dependencies=[Depends(read_access)], tags=["segment"],
              openapi_extra={"requestBody": {"required": True, "content": _IMAGE_TYPES}})  # fmt: skip
    async def segment(
        request: Request,
        panoptic: bool = Query(True, description="run the panoptic inference"),
        instance: bool = Query(False, description="run FC-CLIP's instance inference"),
        format: Literal["json", "png", "coco"] = Query("json", description="how label maps are encoded"),
    ) -> Any:
        """Segment one image: the body is the image file, or multipart/form-data with a part `image`."""
        data = await _image_bytes(request, "image")
        await asyncio.to_thread(encoding.image_size, data, max_pixels)  # headers can be costly: off the loop
        payload = await svc(request).segment(SegmentRequest(data, panoptic, instance, format))
        metrics.observe_stages(payload.get("timings", {}))
        return payload

    # Vocabulary --------------------------------------------------------------------------------
    @app.get("/v1/classes", dependencies=[Depends(read_access)], tags=["vocabulary"])
    async def get_classes(request: Request) -> dict[str, Any]:
        """Every class: id, name, synonyms, thing, number of examples."""
        return {"classes": await svc(request).classes()}

    @app.post("/v1/classes", dependencies=[Depends(write_access)], tags=["vocabulary"], status_code=201)
    async def post_class(request: Request, body: NewClass) -> dict[str, Any]:
        """Add a class by name (classified from its text embedding alone), or synonyms to one."""
        return await svc(request).add_class(body.name, body.synonyms, body.thing)

    @app.delete("/v1/classes/{name:path}", dependencies=[Depends(write_access)], tags=["vocabulary"])
    async def delete_class(request: Request, name: str) -> dict[str, Any]:
        """Delete a class and its examples."""
        return await svc(request).remove_class(name)

    @app.post("/v1/examples", dependencies=[Depends(write_access)], tags=["vocabulary"], status_code=201,
              openapi_extra={"requestBody": {"required": True, "content": _EXAMPLE_FORM}})  # fmt: skip
    async def post_examples(request: Request) -> dict[str, Any]:
        """Add labelled examples: an image, its masks and the names of the masks' values."""
        form = await _form(request)
        image = await _part(form, "image")
        masks = await _part(form, "masks")
        size = await asyncio.to_thread(encoding.image_size, image, max_pixels)
        names = encoding.parse_names(_field(form, "classes"), "classes")
        things = encoding.parse_names(_field(form, "things"), "things")
        if things is not None and not (isinstance(things, dict) and all(isinstance(v, bool) for v in things.values())):
            raise InvalidInputError("'things' must be a JSON object of class name -> true/false")
        filename = getattr(form.get("masks"), "filename", "") or ""
        masks_array, labels = await asyncio.to_thread(encoding.example_masks, masks, filename, names, size)
        return await svc(request).add_examples(image, masks_array, labels, things)

    @app.post("/v1/snapshot", dependencies=[Depends(write_access)], tags=["vocabulary"])
    async def snapshot(request: Request) -> dict[str, Any]:
        """Checkpoint the database (and copy it into --snapshot-dir when configured)."""
        return await svc(request).snapshot()

    app.add_middleware(RequestMetrics, metrics=metrics)
    # Outermost: before anything reads the body.
    app.add_middleware(RequestGuard, auth=auth, limit=max_body_bytes, body_timeout=body_timeout_s)
    return app


async def _form(request: Any) -> Any:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInputError("this endpoint takes multipart/form-data")
    try:
        return await request.form(max_files=4, max_fields=8, max_part_size=1 << 20)
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
