"""The application's ASGI middleware, outermost first: :class:`RequestGuard` (tokens, body size
and body deadline, before anything reads the body) and :class:`RequestMetrics` (requests by route
and status, and their latency)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from knnclip.engine.serve import encoding
from knnclip.engine.serve.auth import AuthError, TokenAuth
from knnclip.engine.serve.metrics import ServiceMetrics

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_POSTS = frozenset({"/v1/segment"})  # a POST that changes nothing


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
            return await _send_json(send, 413, too_large(self.limit), [(b"connection", b"close")])
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
                await _send_json(send, 413, too_large(self.limit), [(b"connection", b"close")])
        except BodyTimeout:
            if not started:
                await _send_json(send, 408, body_timeout(self.body_timeout), [(b"connection", b"close")])


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


def too_large(limit: int) -> dict[str, Any]:
    message = f"the request body is larger than this server's limit of {limit} bytes"
    return {"error": {"type": "PayloadTooLarge", "message": message, "status": 413}}


def body_timeout(seconds: float) -> dict[str, Any]:
    message = f"the request body did not arrive within this server's {seconds:g} s"
    return {"error": {"type": "BodyTimeout", "message": message, "status": 408}}


async def _send_json(
    send: Callable, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
