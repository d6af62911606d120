"""How errors become replies: ``{"error": {"type", "message", "status"}}`` (docs/serving.md),
the library's exception class as the type, a status per kind of error, and ``Retry-After`` where
waiting helps. :func:`install_error_handlers` registers them on an application."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from knnclip.engine.errors import KnnclipError, ServiceError
from knnclip.engine.serve import encoding
from knnclip.engine.serve.auth import AuthError
from knnclip.engine.serve.batcher import DeadlineExceeded, Overloaded, ShuttingDown
from knnclip.engine.serve.middleware import BodyTimeout, PayloadTooLarge, body_timeout, too_large
from knnclip.engine.serve.service import NotReady

log = logging.getLogger("knnclip.serve")


def _reply(status: int, exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(encoding.error_body(exc, status), status, headers=headers)


async def _auth(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, AuthError)
    return _reply(exc.status, exc, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)


async def _overloaded(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, Overloaded)
    return _reply(503, exc, {"Retry-After": str(exc.retry_after)})


async def _unavailable(request: Request, exc: Exception) -> Any:
    request.app.state.metrics.rejections.labels("unavailable").inc()
    return _reply(503, exc, {"Retry-After": "5"})


async def _deadline(request: Request, exc: Exception) -> Any:
    request.app.state.metrics.rejections.labels("deadline").inc()
    return _reply(504, exc)


async def _remote(request: Request, exc: Exception) -> Any:
    """An error a Ray replica reported, passed on as it was."""
    assert isinstance(exc, ServiceError)
    return JSONResponse({"error": {"type": exc.kind, "message": exc.message, "status": exc.status}}, exc.status)


async def _library(request: Request, exc: Exception) -> Any:
    status = encoding.error_status(exc)
    if status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc)
    return _reply(status, exc)


async def _slow_body(request: Request, exc: Exception) -> Any:
    request.app.state.metrics.rejections.labels("body_timeout").inc()
    return JSONResponse(body_timeout(request.app.state.body_timeout_s), 408, headers={"Connection": "close"})


async def _too_large_body(request: Request, exc: Exception) -> Any:
    return JSONResponse(too_large(request.app.state.max_body_bytes), 413)


async def _unexpected(request: Request, exc: Exception) -> Any:
    log.exception("%s %s failed", request.method, request.url.path)
    return _reply(500, RuntimeError("internal error; the server's log has the details"))


HANDLERS: tuple[tuple[type[Exception], Any], ...] = (
    (AuthError, _auth),
    (Overloaded, _overloaded),
    (NotReady, _unavailable),
    (ShuttingDown, _unavailable),
    (DeadlineExceeded, _deadline),
    (ServiceError, _remote),
    (KnnclipError, _library),
    (BodyTimeout, _slow_body),
    (PayloadTooLarge, _too_large_body),
    (Exception, _unexpected),
)


def install_error_handlers(app: Any) -> None:
    """Register every handler of :data:`HANDLERS` on ``app`` (it reads ``app.state.metrics``,
    ``body_timeout_s`` and ``max_body_bytes``)."""
    for kind, handler in HANDLERS:
        app.add_exception_handler(kind, handler)
