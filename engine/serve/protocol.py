"""uvicorn's HTTP/1.1 protocol (h11) with two limits it lacks: a deadline for a request's headers
and a cap on open connections.

A client that sends half a request line and waits (slowloris) holds a connection and a file
descriptor for ever in plain uvicorn, and about a thousand of them lock everyone out, health
checks included. Here a request whose headers are not complete within ``header_timeout`` seconds
is answered 408 and closed, and a connection past ``max_connections`` is answered 503 at once and
closed, so the cap frees itself within the header deadline and the server keeps answering.
The body's own deadline is the application's (``middleware.RequestGuard``).
"""

from __future__ import annotations

import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def _reply(status: int, reason: str, kind: str, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": {"type": kind, "message": message, "status": status}}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def guarded_protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An :class:`H11Protocol` subclass with these limits, for ``uvicorn.Config(http=...)``."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_deadline: Any = None
            if len(self.connections) > max_connections:
                message = f"this server holds its limit of {max_connections} connections; retry shortly"
                transport.write(_reply(503, "Service Unavailable", "Overloaded", message, retry_after=1))
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a request has begun but its headers are not complete
                if self._header_deadline is None and self.conn.trailing_data[0]:
                    self._arm()
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_deadline = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if getattr(self, "_header_deadline", None) is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            message = f"the request's headers did not arrive within this server's {header_timeout:g} s"
            self.transport.write(_reply(408, "Request Timeout", "HeaderTimeout", message))
            self.transport.close()

    return GuardedH11Protocol
