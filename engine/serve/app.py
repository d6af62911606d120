"""The HTTP application (FastAPI), the same for the embedded server and Ray Serve.

Routes (:mod:`~knnclip.engine.serve.routes`) call a :class:`~knnclip.engine.serve.routes.Service`
(``LocalService`` in one process, ``ray_app.RayService`` over Ray deployments): ``app.state.service``,
or the one ``routes.attach_service`` registered. Limits come before work: a body over
``max_body_bytes`` is refused before it is read (:class:`~knnclip.engine.serve.middleware.RequestGuard`,
which also checks the token of a change before any body is read and gives a body ``body_timeout_s``
to arrive), an image over ``max_pixels`` before it is decoded, a full queue at once (503 +
``Retry-After``). Library errors keep their type in the reply (:mod:`~knnclip.engine.serve.handlers`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from knnclip.engine.serve.auth import TokenAuth
from knnclip.engine.serve.docs_ui import install_docs
from knnclip.engine.serve.handlers import install_error_handlers
from knnclip.engine.serve.metrics import ServiceMetrics
from knnclip.engine.serve.middleware import RequestGuard, RequestMetrics
from knnclip.engine.serve.routes import Service, read_access, router, service_of


@asynccontextmanager
async def _no_lifespan(app: Any) -> AsyncIterator[None]:
    yield


def create_app(
    service: Service | None,
    *,
    auth: TokenAuth,
    max_body_bytes: int,
    max_pixels: int,
    lifespan: Callable[[Any], Any] | None = None,
    body_timeout_s: float = 30.0,
) -> Any:
    """The FastAPI application over ``service`` (or over the one ``routes.attach_service`` gives
    it later, as the Ray ingress does); ``lifespan(app)`` is an async context manager factory run
    around the server's life."""
    from knnclip.engine import __version__

    app = FastAPI(
        title="knnclip",
        version=__version__,
        lifespan=lifespan or _no_lifespan,
        docs_url=None,
        redoc_url=None,
        description="Open-vocabulary segmentation with a growing database (kNN-CLIP). docs/serving.md is the contract.",
    )
    # What the routes, the handlers and the middleware read (request.app.state).
    app.state.service, app.state.service_key = service, uuid.uuid4().hex
    app.state.auth, app.state.max_pixels = auth, max_pixels
    app.state.max_body_bytes, app.state.body_timeout_s = max_body_bytes, body_timeout_s
    app.state.metrics = metrics = ServiceMetrics(
        lambda: float(current.queue_depth()) if (current := service_of(app)) else 0.0,
        lambda: float(current.entries()) if (current := service_of(app)) else 0.0,
    )
    install_error_handlers(app)
    install_docs(app, [Depends(read_access)])  # /docs without a CDN (edge servers are often air-gapped)
    app.include_router(router)
    app.add_middleware(RequestMetrics, metrics=metrics)
    # Outermost: before anything reads the body.
    app.add_middleware(RequestGuard, auth=auth, limit=max_body_bytes, body_timeout=body_timeout_s)
    return app
