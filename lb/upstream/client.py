"""lb's own HTTP/1.1 client for talking to nodes: trio streams + h11, keep-alive pooled.

This is the request hot path of the balancer (every proxied request goes through it), so it
is deliberately small: one h11 connection per socket, one ``send_all`` per request (bodies
up to 64 KiB are copied behind the head; larger ones go in a second ``send_all``), no
timeouts of its own besides ``connect_timeout`` and no cap on open connections.

API::

    pool = ConnectionPool("http://127.0.0.1:8000", max_idle=256, idle_timeout=30.0,
                          connect_timeout=10.0, ssl_context=None)
    async with pool.request("POST", "/v1/chat/completions", headers, body,
                            on_sent=None) as resp:
        resp.status                    # int
        resp.headers                   # Headers: list[(name, value)], names lower-case
        chunk = await resp.receive_some()   # body bytes as they arrive; b"" at end of body
        body = await resp.read(limit=None)  # the rest of the body; BodyTooLarge over `limit`
    pool.stats()     # {"idle", "active", "opened", "closed", "retries"}: ints; totals since
                     # creation, open connections = opened - closed = idle + active
    await pool.aclose()

``base_url`` may carry a path prefix (``http://host:8080/v1``): request paths are appended
to it. ``https`` uses ``trio.SSLStream`` with ``ssl.create_default_context()`` unless an
``ssl_context`` is given.

``on_sent``: an optional ``Callable[[], None]``, called (synchronously) once the whole
request, head and body, has been written to the socket, before the wait for the response
head -- e.g. to end a timeout that should bound connect + send but not the node's work. Not
called if the send failed or an early response cut it short (below). After a transparent
retry (below) it is called again once the retry's send completes, so it can be called
twice for one request.

Request headers: the client sets ``host`` and ``content-length`` itself and drops the
caller's ``host``, ``content-length`` and hop-by-hop headers (``connection``,
``transfer-encoding``, ``keep-alive``, ``te``, ``trailer``, ``upgrade``,
``proxy-connection``): they describe the client's connection, not ours. Header names
passed in must be lower-case (as in ``lb.http.types.Headers``).

Connection lifecycle: ``request()`` checks out an idle connection (or opens one), sends
the request and waits for the response head; the response is yielded after the head
arrived. On leaving the context, a connection whose request was sent whole, whose
response was read to the end and that both sides may reuse goes back to the idle list;
any other exit (body not fully read, early response, exception, cancellation) closes the
socket at once, without blocking, so the node sees EOF/RST immediately. The caller owns
all timeouts (cancel scopes around ``request()`` and around each ``receive_some()``); a
cancel at any await point never leaves a connection in the pool.

Early responses (RFC 9112 section 9.5): a node may answer (413, 400, 401...) before it has
read the request body, and often closes the connection without reading it. While a body
larger than 64 KiB is being sent, the client also reads: if a complete response head
arrives before the body is all sent, the send is abandoned and that response is returned.
And whenever a send fails (EPIPE, ECONNRESET), a response head the node already sent is
looked for in what has arrived (without waiting: our side may be the broken one) and
returned if complete. Either way the connection is never reused. Over https, abandoning or
failing a send breaks the TLS stream, so such a response's body is readable only as far as
it had already arrived with the head (in practice: short error bodies, sent in one piece).

Stale connections: before an idle connection is reused it is polled (without blocking);
if it is readable -- the peer closed or reset it, or sent something unsolicited -- it is
dropped. If a reused connection still fails while sending (and no response can be read
from it), or hits EOF/reset before any byte of the response arrived, the request is
retried once on a brand-new connection. A failure on a fresh connection is raised.

Errors, all subclasses of ``UpstreamError``: ``ConnectError`` (refused, DNS, timeout, TLS
handshake), ``LocalResourceError`` (connecting failed because lb itself is out of file
descriptors or memory -- EMFILE, ENFILE, ENOBUFS, ENOMEM -- not the node's fault, and not a
``ConnectError``), ``UpstreamClosed`` (connection dropped / EOF before the response
completed), ``UpstreamProtocolError`` (unparseable response), ``BodyTooLarge``
(``read(limit)`` overflow), ``PoolClosed`` (request on a pool after ``aclose()``); a plain
``UpstreamError`` for a request h11 refuses to send (e.g. an invalid header).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit

import h11
import trio

from lb.http.headers import sendable
from lb.http.types import Headers

__all__ = [
    "BodyTooLarge",
    "ConnectError",
    "ConnectionPool",
    "LocalResourceError",
    "PoolClosed",
    "UpstreamClosed",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamResponse",
]

_READ_SIZE = 65536
# Below this the body is copied into the head buffer so the request goes out in one
# send_all; above it the copy costs more than a second syscall.
_COALESCE_LIMIT = 65536
_DROPPED_REQUEST_HEADERS = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
    }
)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Errors a trio stream raises when the connection is gone.
_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# errno values that mean lb itself ran out of something, whatever the node does.
_LOCAL_ERRNOS = {
    errno.EMFILE: "lb is out of file descriptors (EMFILE: the process limit, RLIMIT_NOFILE)",
    errno.ENFILE: "lb is out of file descriptors (ENFILE: the system-wide limit)",
    errno.ENOBUFS: "lb is out of memory (ENOBUFS: no kernel buffer space for a socket)",
    errno.ENOMEM: "lb is out of memory (ENOMEM)",
}


class UpstreamError(Exception):
    """Base class of everything this client raises."""


class ConnectError(UpstreamError):
    """Could not connect: refused, DNS failure, connect timeout, TLS handshake failure."""


class LocalResourceError(UpstreamError):
    """Could not connect because lb itself is out of file descriptors or memory (EMFILE,
    ENFILE, ENOBUFS, ENOMEM): not the node's fault, so not a ``ConnectError``."""


class UpstreamClosed(UpstreamError):
    """The connection dropped (EOF or reset) before the response completed."""


class UpstreamProtocolError(UpstreamError):
    """The node sent something that is not valid HTTP/1.1."""


class BodyTooLarge(UpstreamError):
    """``UpstreamResponse.read(limit)``: the body is longer than ``limit``."""


class PoolClosed(UpstreamError):
    """``request()`` on a pool after ``aclose()``."""


class _Retry(Exception):
    """Internal: a reused connection turned out dead before any response byte."""


class _Conn:
    """One socket to the node with its h11 state."""

    __slots__ = (
        "eof", "fd", "got_bytes", "h11", "idle_since", "pool", "reused", "sock", "stream",
    )

    def __init__(
        self, pool: ConnectionPool, stream: trio.abc.Stream, sock: trio.socket.SocketType
    ) -> None:
        self.pool = pool
        self.stream = stream
        self.sock = sock  # the TCP socket (under the SSLStream for https)
        # Plain TCP: the descriptor, read and written directly (see `receive` and `send`);
        # None under TLS, where the SSLStream does the I/O.
        self.fd: int | None = sock.fileno() if stream.__class__ is trio.SocketStream else None
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.reused = False
        self.got_bytes = False  # any byte received in the current cycle
        self.eof = False

    def close(self) -> None:
        # Synchronous and never blocks: no TLS close_notify, which is what we want when
        # abandoning a request (the node must see EOF/RST right away).
        if self.sock.fileno() != -1:
            self.sock.close()
            self.pool.closed += 1

    def readable(self) -> bool:
        """True if the idle socket has something to read. An idle HTTP/1.1 connection has
        nothing to say, so readable means EOF, RST or junk (e.g. a 408): not reusable."""
        poller = select.poll()
        try:
            poller.register(self.sock.fileno(), select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    async def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next h11 event, reading from the socket as needed."""
        conn = self.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._protocol_error(exc) from exc
            if event is not h11.NEED_DATA:
                return event
            await self.receive()

    async def receive(self) -> None:
        fd = self.fd
        try:
            if fd is None:
                data = await self.stream.receive_some(_READ_SIZE)
            else:
                # Wait for readability first, then read: the node's answer is seldom already
                # here, so trying a read first (as SocketStream does) mostly fails with EAGAIN,
                # and its context managers cost more than the wait (which is the checkpoint).
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        data = os.read(fd, _READ_SIZE)
                        break
                    except BlockingIOError:
                        continue
        except _IO_ERRORS as exc:
            raise UpstreamClosed(f"connection to node lost: {exc!r}") from exc
        if data:
            self.got_bytes = True
        else:
            self.eof = True
        self.h11.receive_data(data)  # type: ignore[arg-type]  # bytearray works as well

    async def send(self, data: bytes) -> None:
        """Write the whole of `data`. Plain TCP: straight to the socket when it takes all of it
        (the usual case for a request: one syscall, no trio context managers), after a check
        for a cancel, so a cancelled request is never sent; the rest, if any, via send_all."""
        fd = self.fd
        if fd is None:
            await self.stream.send_all(data)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            await self.stream.send_all(memoryview(data)[sent:])

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> UpstreamError:
        # h11 reports an EOF in the middle of a message as a protocol error.
        if self.eof:
            return UpstreamClosed("node closed the connection before the response completed")
        return UpstreamProtocolError(str(exc))


class UpstreamResponse:
    """A response whose head has arrived; the body is read with ``receive_some``/``read``.
    Only valid inside the ``request()`` context."""

    __slots__ = ("_conn", "_done", "headers", "http_version", "reason", "status")

    def __init__(self, conn: _Conn, event: h11.Response) -> None:
        self.status: int = event.status_code
        # As lb.http.server's _header_list: raw_items() is much cheaper than iterating.
        self.headers: Headers = [(name.lower(), value) for name, value in event.headers.raw_items()]
        self.reason: bytes = event.reason
        self.http_version: bytes = event.http_version
        self._conn: _Conn | None = conn
        self._done = False

    @property
    def complete(self) -> bool:
        """True once the whole body was received."""
        return self._done

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def receive_some(self) -> bytes:
        """The next body bytes, as soon as any arrive (chunk framing removed); b"" at the end.

        Returns everything already buffered in one piece, but never waits for more once it
        has something to return.
        """
        conn = self._conn
        if conn is None:
            raise UpstreamError("response used after its request() context was left")
        if self._done:
            return b""
        h = conn.h11
        parts: list[bytes] = []
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise conn._protocol_error(exc) from exc
            # h11's events are ABCs, so isinstance goes through ABCMeta: this runs per stream
            # event, and exact type checks are much cheaper (h11 never subclasses its events).
            kind = type(event)
            if kind is h11.Data:
                parts.append(bytes(event.data))  # type: ignore[union-attr]
            elif event is h11.NEED_DATA:
                if parts:
                    break
                await conn.receive()
            elif kind is h11.EndOfMessage:
                self._done = True
                break
            elif kind is h11.ConnectionClosed:
                raise UpstreamClosed("node closed the connection before the response completed")
            else:
                raise UpstreamProtocolError(f"unexpected event from node: {event!r}")
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body. Raises ``BodyTooLarge`` if it exceeds ``limit`` bytes (the
        connection is then closed when the context is left)."""
        if limit is not None:
            length = self.header(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise BodyTooLarge(f"response body of {int(length)} bytes exceeds {limit}")
        parts: list[bytes] = []
        total = 0
        while True:
            data = await self.receive_some()
            if not data:
                break
            total += len(data)
            if limit is not None and total > limit:
                raise BodyTooLarge(f"response body exceeds {limit} bytes")
            parts.append(data)
        return b"".join(parts)


async def _read_head(conn: _Conn) -> h11.Response:
    """Wait for the response head, skipping 1xx responses."""
    while True:
        event = await conn.next_event()
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.ConnectionClosed):
            raise UpstreamClosed("node closed the connection before responding")
        raise UpstreamProtocolError(f"unexpected event from node: {event!r}")


async def _salvage_response(conn: _Conn) -> h11.Response | None:
    """After a failed send: the response head the node sent before it closed, if it is
    already here. Reads only while the socket is readable, never waits for more (our own
    side may be the broken one, with a live but silent node at the other end)."""
    h = conn.h11
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError:
            return None
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.InformationalResponse):
            continue
        if event is not h11.NEED_DATA or not conn.readable():
            return None
        try:
            await conn.receive()
        except UpstreamClosed:
            return None


async def _send_failed(conn: _Conn, exc: BaseException) -> UpstreamResponse:
    """A send failed: the node may have answered (413, 400...) and closed before reading
    all of the request, and what it sent is likely still in our receive buffer. Returns
    that response, or raises ``_Retry`` (a reused connection, nothing received) or
    ``UpstreamClosed``."""
    event = await _salvage_response(conn)
    if event is not None:
        return _early_response(conn, event)
    if conn.reused and not conn.got_bytes:
        raise _Retry from exc
    raise UpstreamClosed(f"connection to node lost while sending: {exc!r}") from exc


def _early_response(conn: _Conn, event: h11.Response) -> UpstreamResponse:
    """A response that came while the request was not all sent: the connection can never be
    reused (the node's view of where our request ends is unknown)."""
    conn.h11.send(h11.ConnectionClosed())  # our side CLOSED: _release will close it
    return UpstreamResponse(conn, event)


class _RequestContext:
    """What ``ConnectionPool.request()`` returns: sends on enter, releases on exit."""

    __slots__ = (
        "_body",
        "_conn",
        "_headers",
        "_method",
        "_on_sent",
        "_path",
        "_pool",
        "_response",
    )

    def __init__(
        self,
        pool: ConnectionPool,
        method: str,
        path: str,
        headers: Headers,
        body: bytes,
        on_sent: Callable[[], None] | None,
    ) -> None:
        self._pool = pool
        self._method = method
        self._path = path
        self._headers = headers
        self._body = body
        self._on_sent = on_sent
        self._conn: _Conn | None = None
        self._response: UpstreamResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        pool = self._pool
        if self._conn is not None:
            raise RuntimeError("request() context entered twice")
        conn = pool._checkout()
        while True:
            if conn is None:
                conn = await pool._connect()
            pool.active += 1
            try:
                response = await self._exchange(conn)
            except _Retry:
                pool.active -= 1
                pool.retries += 1
                conn.close()
                conn = None  # exactly one retry, on a brand-new connection
                continue
            except BaseException:
                pool.active -= 1
                conn.close()
                raise
            self._conn = conn
            self._response = response
            return response

    async def _exchange(self, conn: _Conn) -> UpstreamResponse:
        h = conn.h11
        body = self._body
        method = self._method
        headers: Headers = [(b"host", self._pool._host_header)]
        headers.extend(kv for kv in self._headers if kv[0] not in _DROPPED_REQUEST_HEADERS)
        if body or method in _BODY_METHODS:
            headers.append((b"content-length", str(len(body)).encode()))
        target = self._pool._prefix + self._path
        try:
            if sendable(headers):  # h11 need not check each header again
                request = h11.Request(
                    method=method.encode("ascii"), target=target.encode("ascii"),
                    headers=headers, _parsed=True,
                )
            else:  # h11 says what is wrong
                request = h11.Request(method=method, target=target, headers=headers)
            head = h.send(request)
            if body:
                # passthrough: h11 tracks the length without copying the body
                h.send_with_data_passthrough(h11.Data(data=body))
            h.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise UpstreamError(f"invalid request: {exc}") from exc
        if len(body) > _COALESCE_LIMIT:
            return await self._send_large(conn, head, body)
        try:
            await conn.send(head + body if body else head)
        except _IO_ERRORS as exc:
            return await _send_failed(conn, exc)
        if self._on_sent is not None:
            self._on_sent()
        try:
            while True:
                event = await conn.next_event()
                if isinstance(event, h11.Response):
                    return UpstreamResponse(conn, event)
                if isinstance(event, h11.InformationalResponse):
                    continue  # 100 Continue and friends
                if isinstance(event, h11.ConnectionClosed):
                    raise UpstreamClosed("node closed the connection before responding")
                raise UpstreamProtocolError(f"unexpected event from node: {event!r}")
        except UpstreamClosed:
            if conn.reused and not conn.got_bytes:
                raise _Retry from None
            raise

    async def _send_large(self, conn: _Conn, head: bytes, body: bytes) -> UpstreamResponse:
        """``_exchange`` for a body too large to copy behind the head: two ``send_all``,
        and the body is sent while the response head is read (RFC 9112 section 9.5).

        A head that arrives before the body is all sent cuts the send short and is returned
        as an early response (the connection is not reused). Otherwise this is the usual
        send, ``on_sent()``, wait for the head.
        """
        try:
            await conn.send(head)
        except _IO_ERRORS as exc:
            return await _send_failed(conn, exc)
        event: h11.Response | None = None
        error: UpstreamError | None = None  # the head read's
        send_error: BaseException | None = None
        callback_error: BaseException | None = None
        sent = False

        async def read_head() -> None:
            nonlocal event, error
            try:
                event = await _read_head(conn)
            except UpstreamError as exc:
                error = exc
                if isinstance(exc, UpstreamClosed) and not sent:
                    # EOF or reset: the send fails too (a response may be salvaged), or, if
                    # the node half-closed but still reads, this error is raised after it.
                    return
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_head)
            try:
                await conn.send(body)
            except _IO_ERRORS as exc:
                send_error = exc
                nursery.cancel_scope.cancel()
            else:
                sent = True
                if self._on_sent is not None:
                    try:
                        self._on_sent()
                    except BaseException as exc:  # raised as is, not in an ExceptionGroup
                        callback_error = exc
                        nursery.cancel_scope.cancel()
        if callback_error is not None:
            raise callback_error
        if event is not None:
            return UpstreamResponse(conn, event) if sent else _early_response(conn, event)
        if send_error is not None:
            return await _send_failed(conn, send_error)
        assert error is not None
        if isinstance(error, UpstreamClosed) and conn.reused and not conn.got_bytes:
            raise _Retry from error
        raise error

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        response = self._response
        self._conn = None
        if conn is None or response is None:
            return
        response._conn = None
        pool = self._pool
        pool.active -= 1
        if exc_type is None and response._done:
            pool._release(conn)
        else:
            conn.close()


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one node origin (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        *,
        max_idle: int = 256,
        idle_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme in {base_url!r}")
        if not url.hostname:
            raise ValueError(f"no host in {base_url!r}")
        self.base_url = base_url
        self.scheme = url.scheme
        self.host: str = url.hostname
        default_port = 443 if url.scheme == "https" else 80
        self.port: int = url.port or default_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != default_port:
            host = f"{host}:{self.port}"
        self._host_header = host.encode("ascii")
        self._prefix = url.path.rstrip("/")
        self._ssl_context: ssl.SSLContext | None = None
        if url.scheme == "https":
            self._ssl_context = ssl_context or ssl.create_default_context()
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        # Most recently used at the right: checkout takes from the right (warmest
        # connection, least likely to have been closed by the node), expiry trims the left.
        self._idle: deque[_Conn] = deque()
        self._closed = False
        self.active = 0  # connections checked out by requests in flight
        self.opened = 0  # connections opened in total
        self.closed = 0  # connections closed in total
        self.retries = 0  # requests retried because a reused connection was dead

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def stats(self) -> dict[str, int]:
        return {
            "idle": len(self._idle),
            "active": self.active,
            "opened": self.opened,
            "closed": self.closed,
            "retries": self.retries,
        }

    def request(
        self,
        method: str,
        path: str,
        headers: Headers,
        body: bytes = b"",
        *,
        on_sent: Callable[[], None] | None = None,
    ) -> _RequestContext:
        """``async with pool.request(...) as response:`` -- see the module docstring.

        `path` is appended to the base URL's path prefix and may include a query string.
        `on_sent()` is called once the whole request is written, before the wait for the
        response head (again after a transparent retry's send; not if an early response cut
        the send short).
        """
        if self._closed:
            raise PoolClosed(f"connection pool for {self.base_url} is closed")
        if path[:1] != "/":
            path = "/" + path
        return _RequestContext(self, method, path, headers, body, on_sent)

    async def aclose(self) -> None:
        """Close all idle connections; connections in use are closed when their request
        ends. Later ``request()`` calls raise ``PoolClosed``."""
        self._closed = True
        idle = self._idle
        while idle:
            idle.pop().close()

    def _checkout(self) -> _Conn | None:
        idle = self._idle
        if not idle:
            return None
        now = time.monotonic()
        self._expire(now)
        while idle:
            conn = idle.pop()
            if conn.readable():
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    def _expire(self, now: float) -> None:
        idle = self._idle
        deadline = now - self.idle_timeout
        while idle and idle[0].idle_since < deadline:
            idle.popleft().close()

    def _release(self, conn: _Conn) -> None:
        h = conn.h11
        if (
            self._closed
            or h.our_state is not h11.DONE
            or h.their_state is not h11.DONE
            or conn.eof  # a read-until-close body (h11 leaves that in DONE)
            or h.trailing_data[0]  # bytes after the response: can't trust the stream
        ):
            conn.close()
            return
        h.start_next_cycle()
        conn.got_bytes = False
        now = time.monotonic()
        conn.idle_since = now
        idle = self._idle
        self._expire(now)
        if len(idle) >= self.max_idle:
            if self.max_idle <= 0:
                conn.close()
                return
            idle.popleft().close()
        idle.append(conn)

    async def _connect(self) -> _Conn:
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(self.host, self.port)
                self.opened += 1
                if self._ssl_context is None:
                    return _Conn(self, tcp, tcp.socket)
                tls = trio.SSLStream(
                    tcp, self._ssl_context, server_hostname=self.host, https_compatible=True
                )
                conn = _Conn(self, tls, tcp.socket)
                try:
                    await tls.do_handshake()  # here, so a bad certificate is a ConnectError
                except BaseException:
                    conn.close()
                    raise
                return conn
        except trio.TooSlowError as exc:
            raise ConnectError(
                f"connecting to {self.base_url} timed out after {self.connect_timeout}s"
            ) from exc
        except (OSError, trio.BrokenResourceError) as exc:
            local = _local_resource_problem(exc)
            if local is not None:
                raise LocalResourceError(
                    f"cannot connect to {self.base_url}: {local}: {exc!r}"
                ) from exc
            raise ConnectError(f"cannot connect to {self.base_url}: {exc!r}") from exc


def _local_resource_problem(exc: BaseException) -> str | None:
    """What lb itself ran out of, if `exc` or anything it wraps says so; else None.

    ``trio.open_tcp_stream`` raises a socket's error as is (from a host name lookup), or, for
    failed connection attempts, a plain ``OSError`` ("all attempts ... failed") whose
    ``__cause__`` is an ``ExceptionGroup`` of each attempt's ``OSError``: the whole chain is
    searched (``__cause__``, ``__context__``, group members).
    """
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        err = todo.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, socket.gaierror):
            if err.errno == socket.EAI_MEMORY:
                return "lb is out of memory (EAI_MEMORY from the host name lookup)"
        elif isinstance(err, OSError) and err.errno in _LOCAL_ERRNOS:
            return _LOCAL_ERRNOS[err.errno]
        if isinstance(err, BaseExceptionGroup):
            todo.extend(err.exceptions)
        if err.__cause__ is not None:
            todo.append(err.__cause__)
        if err.__context__ is not None:
            todo.append(err.__context__)
    return None
