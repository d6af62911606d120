"""The embedded server: the application over a :class:`LocalService`, on uvicorn.

uvicorn handles SIGTERM and SIGINT: it stops accepting connections, lets the requests in flight
finish (up to ``graceful_s``), then the application's shutdown finishes the queued requests and
closes the database cleanly. The socket is bound here, so ``port=0`` picks a free port and the
line ``knnclip serve: listening on http://HOST:PORT`` on standard output names it.
"""

from __future__ import annotations

import logging
import math
import socket
import sys
from contextlib import asynccontextmanager
from typing import Any

from knnclip.engine.serve.auth import TokenAuth, load_token
from knnclip.engine.serve.service import LocalService, ServeSettings

log = logging.getLogger("knnclip.serve")


def build(settings: ServeSettings) -> tuple[Any, LocalService]:
    """(the application, its service); the service starts with the application."""
    from knnclip.engine.serve.app import create_app

    auth = TokenAuth(load_token(settings.token_file), auth_reads=settings.auth_reads)
    service = LocalService(settings)

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        metrics = app.state.metrics
        service.batcher.on_batch = metrics.observe_batch
        service.batcher.on_reject = metrics.rejections.labels("queue_full").inc
        service.start(on_loaded=_on_loaded)
        yield
        await service.stop()

    def _on_loaded(error: BaseException | None) -> None:
        if error is not None and server_ref:
            server_ref[0].should_exit = True  # nothing to serve: exit, and say why

    server_ref: list[Any] = []
    app = create_app(
        service,
        auth=auth,
        max_body_bytes=settings.max_body_bytes,
        max_pixels=settings.max_pixels,
        lifespan=lifespan,
        body_timeout_s=settings.body_timeout_s,
    )
    app.state.server_ref = server_ref
    if not auth.mutations_enabled:
        log.warning("no token configured (--token-file or KNNCLIP_SERVE_TOKEN): changes to the vocabulary are disabled")
    return app, service


def serve(settings: ServeSettings, *, graceful_s: float = 30.0, log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT. Raises the load error (corrupt database, locked, missing
    models) when the service could not start."""
    import uvicorn

    from knnclip.engine.serve.protocol import guarded_protocol

    app, service = build(settings)
    sock = _bind(settings.host, settings.port)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(graceful_s),
        server_header=False,
        date_header=True,
        limit_max_requests=None,
        timeout_keep_alive=5,
        http=guarded_protocol(settings.header_timeout_s, settings.max_connections),
    )
    server = uvicorn.Server(config)
    app.state.server_ref.append(server)
    host, port = sock.getsockname()[:2]
    print(f"knnclip serve: listening on http://{_url_host(host)}:{port}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if service.load_error is not None:
        raise service.load_error


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def configure_logging(level: int = logging.INFO) -> None:
    """knnclip's own log lines on standard error (uvicorn configures its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("knnclip")
    root.addHandler(handler)
    root.setLevel(level)
