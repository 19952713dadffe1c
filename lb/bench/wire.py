"""The bench's own HTTP/1.1 client: prebuilt request bytes out, llhttp (httptools) parsing in.

`lb bench` must never be the bottleneck of what it measures, so it does not go through lb's
upstream client (with h11's event machinery per request, the generator cost about what the
mock node does, ~0.11 CPU-ms per request; this client costs about a third of that): a
request is one `os.write` of bytes built once per distinct request, and the answer is read
into one shared 256 KiB buffer and parsed by llhttp, the C parser uvicorn uses. Keep-alive
connections are pooled per target; https goes through `trio.SSLStream`.

    target = Target("http://127.0.0.1:8000", headers=[(b"authorization", b"Bearer k")])
    conn = await target.send(target.payload(request))   # after its first read
    response = conn.response    # status, headers_done, complete
    while True:
        for piece in response.take():   # body bytes (chunk framing removed) of the last read
            ...
        if response.complete:
            break
        await conn.read()
    target.release(conn, trio.current_time())   # back to the pool if reusable, else closed
    await target.aclose()

Errors are `WireError`s whose `kind` is the bench's error kind: "connect", "generator out of
fds" (the generator's own limit, not the target's fault), "closed" (EOF or reset before the
response ended), "protocol" (not HTTP/1.1), "client" (a request that cannot be put on the
wire). A reused connection that the target closed while idle (EOF or reset before any byte
of the answer) is retried once on a new one, as lb's own client does.
"""

from __future__ import annotations

import errno
import os
import re
import select
import ssl
from collections import deque
from collections.abc import Iterable
from urllib.parse import urlsplit

import httptools
import trio

from lb.bench.workloads import Request

__all__ = ["Response", "Target", "WireConn", "WireError"]

_READ_SIZE = 262144
# Every plain read lands here and is parsed before the next await, so one buffer serves all
# connections: a fresh 256 KiB bytes per read would cost an mmap, an mremap and a munmap.
_BUFFER = bytearray(_READ_SIZE)
_VIEW = memoryview(_BUFFER)
_IDLE_CHECK = 1.0  # seconds idle after which a pooled connection is polled before reuse
_DROPPED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection",
                      b"keep-alive", b"te", b"trailer", b"upgrade", b"proxy-connection"})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")  # no CR, LF or other controls
_TARGET = re.compile(r"/[!-~]*")  # a request target: printable ASCII, no space
_IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class WireError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Retry(Exception):
    """A reused connection turned out closed before any byte of the answer."""


class Response:
    """A response being parsed, pure (no I/O): `feed` it what arrives, b"" at EOF. It is
    llhttp's callback object; one per connection, `reset` between keep-alive exchanges."""

    __slots__ = ("_framed", "_parts", "complete", "got_bytes", "headers_done", "junk",
                 "keep_alive", "parser", "status")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.junk = False  # bytes after the response: the connection cannot be trusted
        self.keep_alive = False  # llhttp's verdict, known only until the message completes
        self.got_bytes = False
        self._framed = False  # a content-length or transfer-encoding header came
        self._parts: list[bytes] = []

    def take(self) -> list[bytes]:
        """The body bytes (chunk framing removed) that came since the last call, in pieces."""
        parts = self._parts
        if parts:
            self._parts = []
        return parts

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Parse the next bytes; b"" is the end of the connection. Raises WireError: "closed"
        at an EOF before the response ended (except for a body delimited by the close),
        "protocol" for anything but HTTP/1.1."""
        if not data:
            if self.headers_done and not self._framed and self.status not in (204, 304):
                self.complete = True  # a body that ends with the connection
                self.junk = True  # and so the connection is not reused
                return
            if not self.complete:
                raise WireError("closed", "the server closed the connection before the "
                                "response ended")
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            raise WireError("protocol", f"unexpected upgrade: {exc}") from exc
        except httptools.HttpParserError as exc:
            if not self.complete:
                raise WireError("protocol", f"not a valid HTTP/1.1 response: {exc}") from exc
            self.junk = True  # garbage after a complete response

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.junk

    # llhttp's callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.junk = True
        else:
            self._parts.append(body)

    def on_message_begin(self) -> None:
        if self.complete:
            self.junk = True

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200 and self.status != 101:  # 100 Continue: the answer follows
            self.status = 0
            self.headers_done = self._framed = False
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()


class WireConn:
    """One connection to the target and the response being read on it."""

    __slots__ = ("_stream", "fd", "idle_since", "response", "sock")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self._stream = stream
        self.sock = sock
        # Plain TCP: the descriptor, read and written directly; None under TLS.
        self.fd: int | None = sock.fileno() if stream.__class__ is trio.SocketStream else None
        self.response = Response()
        self.idle_since = 0.0

    async def send(self, data: bytes) -> None:
        fd = self.fd
        if fd is None:
            await self._stream.send_all(data)
            return
        try:
            sent = os.write(fd, data)  # the usual case: one syscall takes it all
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            await self._stream.send_all(memoryview(data)[sent:])

    async def read(self) -> None:
        """Read what arrives next into the response (see `Response.feed`)."""
        fd = self.fd
        data: bytes | bytearray | memoryview
        try:
            if fd is None:
                data = await self._stream.receive_some(_READ_SIZE)
            else:
                # The answer is seldom already there: wait first, then read.
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        data = _VIEW[:os.readv(fd, (_BUFFER,))]
                        break
                    except BlockingIOError:
                        continue
        except _IO_ERRORS as exc:
            raise WireError("closed", f"connection lost: {exc!r}") from exc
        self.response.feed(data)

    def readable(self) -> bool:
        """An idle connection with something to read (EOF, reset, a 408) is not reusable."""
        poller = select.poll()
        try:
            poller.register(self.sock.fileno(), select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        # Synchronous, never blocks: the target sees EOF/RST at once.
        if self.sock.fileno() != -1:
            self.sock.close()


class Target:
    """One origin (`http[s]://host[:port][/prefix]`), its pooled connections and the request
    head every request to it starts with."""

    def __init__(self, url: str, headers: Iterable[tuple[bytes, bytes]] = (),
                 connect_timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r}: expected http://host[:port] or https://...")
        self.url = url
        self.host: str = parts.hostname
        default_port = 443 if parts.scheme == "https" else 80
        self.port: int = parts.port or default_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != default_port:
            host = f"{host}:{self.port}"
        self._prefix = parts.path.rstrip("/")
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self.connect_timeout = connect_timeout
        lines = [b"host: " + host.encode("idna")]
        for name, value in headers:
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            if not _FIELD_VALUE.fullmatch(value):
                raise ValueError(f"invalid value for header {name.decode()!r}: {value!r}")
            if name.lower() not in _DROPPED:
                lines.append(name + b": " + value)
        self._headers = b"\r\n".join(lines) + b"\r\n"
        self._idle: deque[WireConn] = deque()
        self._last: tuple[Request | None, bytes] = (None, b"")

    def payload(self, request: Request) -> bytes:
        """The request's bytes on the wire (built once for a workload's repeated request)."""
        last, data = self._last
        if request is last:
            return data
        path = self._prefix + request.path
        if not _TARGET.fullmatch(path):
            raise WireError("client", f"invalid request path {path!r}")
        data = b"".join((b"POST ", path.encode("ascii"), b" HTTP/1.1\r\n", self._headers,
                         b"content-length: %d\r\n\r\n" % len(request.body), request.body))
        self._last = (request, data)
        return data

    async def send(self, payload: bytes) -> WireConn:
        """Send on a pooled (or new) connection and read the first bytes of the answer."""
        conn = self._checkout()
        while True:
            fresh = conn is None
            if conn is None:
                conn = await self._connect()
            try:
                try:
                    await conn.send(payload)
                except _IO_ERRORS as exc:
                    if not fresh:
                        raise _Retry from exc
                    _salvage(conn, exc)  # an early answer (413...) or "closed"
                    return conn
                try:
                    await conn.read()
                except WireError as exc:
                    if exc.kind == "closed" and not fresh and not conn.response.got_bytes:
                        raise _Retry from exc
                    raise
                return conn
            except _Retry:
                conn.close()
                conn = None  # exactly one retry, on a new connection
            except BaseException:
                conn.close()
                raise

    def release(self, conn: WireConn, now: float) -> None:
        """After a request: a connection that may be reused goes back to the pool."""
        if conn.response.reusable():
            conn.response.reset()
            conn.idle_since = now
            self._idle.append(conn)
        else:
            conn.close()

    def _checkout(self) -> WireConn | None:
        idle = self._idle
        while idle:
            conn = idle.pop()  # the warmest
            if trio.current_time() - conn.idle_since > _IDLE_CHECK and conn.readable():
                conn.close()
                continue
            return conn
        return None

    async def _connect(self) -> WireConn:
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(self.host, self.port)
                if self._ssl is None:
                    return WireConn(tcp, tcp.socket)
                tls = trio.SSLStream(tcp, self._ssl, server_hostname=self.host,
                                     https_compatible=True)
                conn = WireConn(tls, tcp.socket)
                try:
                    await tls.do_handshake()
                except BaseException:
                    conn.close()
                    raise
                return conn
        except trio.TooSlowError as exc:
            raise WireError("connect", f"connecting to {self.url} timed out") from exc
        except (*_IO_ERRORS, ssl.SSLError) as exc:
            if _local(exc):
                raise WireError("generator out of fds", f"cannot connect: {exc!r}") from exc
            raise WireError("connect", f"cannot connect to {self.url}: {exc!r}") from exc

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _salvage(conn: WireConn, exc: BaseException) -> None:
    """A send failed on a new connection: the server may have answered before reading the
    whole request (and closed): that answer is the result if it is already here."""
    fd = conn.fd
    response = conn.response
    if fd is not None:
        try:
            while size := os.readv(fd, (_BUFFER,)):
                response.feed(_VIEW[:size])
        except (OSError, WireError):
            pass
    if not response.headers_done:
        raise WireError("closed", f"connection lost while sending: {exc!r}") from exc
    response.complete = response.junk = True  # the body that came with the head; not reused


def _local(exc: BaseException) -> bool:
    """The generator itself ran out (EMFILE, ENFILE, ENOBUFS, ENOMEM), anywhere in the chain
    of causes trio.open_tcp_stream raises."""
    todo = [exc]
    seen: set[int] = set()
    while todo:
        err = todo.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _LOCAL_ERRNOS:
            return True
        if isinstance(err, BaseExceptionGroup):
            todo.extend(err.exceptions)
        todo.extend(e for e in (err.__cause__, err.__context__) if e is not None)
    return False
