"""Request and response values exchanged between the HTTP server and the handlers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl

import attrs
import orjson

Headers = list[tuple[bytes, bytes]]
SendBody = Callable[[bytes], Awaitable[None]]
# A streamed body is written by a coroutine that the server calls with a `send` function.
# It runs inside the request's cancel scope, so a client disconnect cancels it. The response
# head is sent with the first `send`: until then the writer may still change the Response's
# status and headers, or raise HTTPError to answer an ordinary error instead.
StreamBody = Callable[[SendBody], Awaitable[None]]

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]


@attrs.define(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: Headers  # names are lower-case (h11 normalises them)
    body: bytes = b""
    client: str = ""
    path_params: dict[str, str] = attrs.field(factory=dict)

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def query_params(self) -> dict[str, str]:
        return dict(parse_qsl(self.query, keep_blank_values=True))


@attrs.define(slots=True)
class Response:
    status: int = 200
    headers: Headers = attrs.field(factory=list)
    body: bytes = b""
    stream: StreamBody | None = None

    @classmethod
    def json(
        cls, obj: Any, status: int = 200, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> Response:
        return cls(status, [*JSON_HEADERS, *headers], orjson.dumps(obj))


Handler = Callable[[Request], Awaitable[Response]]
