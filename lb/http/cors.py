"""CORS for browser clients (`LB_CORS_ORIGINS`): preflights answered for any path, and every
answer to an allowed origin carries Access-Control-Allow-Origin and exposes lb's headers."""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from lb.http.types import Headers, Request, Response

EXPOSED = b"x-request-id, x-selected-model, x-routed-node, x-attempts, x-upstream-request-id, " \
    b"retry-after"
METHODS = b"GET, POST, OPTIONS"
# What a browser chat UI and the SDKs send; a preflight asking for others gets those echoed
# when they are plain header names.
DEFAULT_HEADERS = b"authorization, content-type, x-session-id, x-request-id, " \
    b"x-request-budget-ms, x-prefer-small, x-api-key, anthropic-version"
_HEADER_LIST = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
MAX_AGE = b"600"


@attrs.frozen
class CorsPolicy:
    origins: frozenset[bytes]  # b"*" allows any

    @classmethod
    def from_setting(cls, origins: Iterable[str]) -> CorsPolicy | None:
        allowed = frozenset(origin.strip().rstrip("/").encode() for origin in origins if origin)
        return cls(allowed) if allowed else None

    def allow(self, origin: bytes | None) -> bytes | None:
        """The Access-Control-Allow-Origin value for `origin`, or None if it is not allowed."""
        if origin is None:
            return None
        if b"*" in self.origins:
            return b"*"
        return origin if origin in self.origins else None

    def tags(self, origin: bytes) -> Headers:
        """Headers every answer to an allowed origin carries."""
        headers = [(b"access-control-allow-origin", origin), (b"access-control-expose-headers",
                                                           EXPOSED)]
        if origin != b"*":
            headers.append((b"vary", b"Origin"))
        return headers

    def preflight(self, request: Request) -> Response:
        asked = request.header(b"access-control-request-headers")
        headers = DEFAULT_HEADERS
        if asked and _HEADER_LIST.fullmatch(asked.strip()):
            headers = DEFAULT_HEADERS + b", " + asked.strip().lower()
        return Response(204, [
            (b"access-control-allow-methods", METHODS),
            (b"access-control-allow-headers", headers),
            (b"access-control-max-age", MAX_AGE),
        ])
