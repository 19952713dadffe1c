"""Request and response values exchanged between the HTTP server and the handlers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol
from urllib.parse import parse_qsl

import attrs
import orjson
import trio

Headers = list[tuple[bytes, bytes]]

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]


class ClientGone(Exception):
    """The client cannot be written to any more: it left, reset the connection, or left a write
    blocked past LB_SEND_TIMEOUT_SECS. Nothing more may be sent on that connection."""


class ResponseSink(Protocol):
    """Where a handler writes its answer. The head is only recorded until the first `send`,
    which commits it: until then the writer may still choose another status (an error, a
    failover's answer). The sink owns the headers lb puts on every answer."""

    @property
    def committed(self) -> bool:
        """True once the head went out: from then on only body bytes can follow."""
        ...

    def head(self, status: int, headers: Headers) -> None:
        """Record the status and headers (replacing earlier ones); raises once committed."""
        ...

    def tag(self, name: bytes, value: bytes) -> None:
        """A header lb sets on this answer whatever it becomes (an error included); a node's
        header of the same name is dropped."""
        ...

    async def send(self, data: bytes) -> None:
        """Write body bytes, committing the head first; raises ClientGone."""
        ...

    def cancel_on_drain(self, scope: trio.CancelScope) -> None:
        """Cancel `scope` when a drain's grace runs out, leaving the writer a moment to end
        its answer properly (a stream's error event) before the connection is cut."""
        ...


# A streamed body is written by a coroutine that the server calls with the request's sink. It
# runs inside the request's cancel scope, so a client disconnect cancels it. It may raise an
# LBError before the head is committed to answer an ordinary error instead.
StreamBody = Callable[[ResponseSink], Awaitable[None]]


@attrs.define(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: Headers  # names are lower-case (h11 normalises them)
    body: bytes = b""
    client: str = ""
    path_params: dict[str, str] = attrs.field(factory=dict)
    request_id: str = ""  # the client's x-request-id (checked) or one the server made

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def query_params(self) -> dict[str, str]:
        return dict(parse_qsl(self.query, keep_blank_values=True))


@attrs.frozen(slots=True)
class Response:
    """A whole answer (or, with `stream`, a writer of one)."""

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
