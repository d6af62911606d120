"""Bearer tokens: mutations need one, reads only with ``--auth-reads``.

The token comes from a file (``--token-file``, first line, surrounding white space dropped) or
the ``KNNCLIP_SERVE_TOKEN`` environment variable. Without one, mutations are disabled (403), not
open. Tokens are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from knnclip.engine.errors import InvalidInputError

TOKEN_ENV = "KNNCLIP_SERVE_TOKEN"
MIN_TOKEN_LENGTH = 16


class AuthError(Exception):
    """``status`` 401 (no or malformed credentials) or 403 (wrong token, or mutations disabled)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def load_token(token_file: str | os.PathLike[str] | None) -> str | None:
    """The configured token, or None. A token file must not be readable by others."""
    if token_file is not None:
        path = Path(token_file)
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInputError(f"{path}: cannot read the token file ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise InvalidInputError(f"{path}: the token file is not UTF-8 text") from None
        if mode & 0o077:
            raise InvalidInputError(f"{path}: the token file is readable by others; chmod 600 it")
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        source = str(path)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = TOKEN_ENV
        if not token:
            return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise InvalidInputError(f"{source}: the token must have at least {MIN_TOKEN_LENGTH} characters")
    return token


class TokenAuth:
    """Checks ``Authorization: Bearer <token>`` headers against the configured token."""

    def __init__(self, token: str | None, *, auth_reads: bool = False) -> None:
        self._token = token.encode("utf-8") if token else None
        self.auth_reads = auth_reads
        if auth_reads and token is None:
            raise InvalidInputError("--auth-reads needs a token (--token-file or KNNCLIP_SERVE_TOKEN)")

    @property
    def mutations_enabled(self) -> bool:
        return self._token is not None

    def check(self, header: str | None, *, mutation: bool) -> None:
        """Raise :class:`AuthError` unless ``header`` may do a mutation (or a read)."""
        if not mutation and not self.auth_reads:
            return
        if self._token is None:
            raise AuthError(403, "changes are disabled: start the server with --token-file to allow them")
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError(401, "this needs 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(value.strip().encode("utf-8"), self._token):
            raise AuthError(403, "the token is not valid")
