"""What a node is to dispatch: something that answers HTTP requests. The h11 pool
(`lb.upstream.client.ConnectionPool`) is one implementation; a scripted fake in the tests is
another, so dispatch is tested on trio's autojump clock without sockets."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from lb.http.types import Headers


class UpstreamResponse(Protocol):
    """A response whose head has arrived. Errors are `lb.upstream.client.UpstreamError`s."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Headers: ...

    async def receive_some(self) -> bytes:
        """The next body bytes as soon as any arrive; b"" at the end of the body."""
        ...

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body (BodyTooLarge over `limit`)."""
        ...


class Upstream(Protocol):
    def request(
        self, method: str, path: str, headers: Headers, body: bytes = b"", *,
        on_sent: Callable[[], None] | None = None,
    ) -> AbstractAsyncContextManager[UpstreamResponse]:
        """Send a request; the context yields once the response head arrived. `on_sent` is
        called when the whole request went out. Leaving the context early closes the
        connection (the node sees it at once)."""
        ...

    async def aclose(self) -> None: ...
