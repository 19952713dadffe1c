"""The h11 HTTP/1.1 server: keep-alive, limits, client-disconnect cancellation and graceful
drain.

Each connection is a nursery of two tasks that lives as long as the connection. The reader
waits until the socket is readable and feeds what it reads to h11; it stops reading while more
than MAX_PIPELINED_BYTES sit unparsed, until the other task has consumed them. The other task
runs the keep-alive loop: it takes h11's events (waiting for the reader when h11 needs data,
bounded by the keep-alive and header timeouts), reads the body (bounded by size, by the header
timeout between reads and by the body timeout in all), runs the handler and sends its response.
When the reader sees EOF or a reset while a request is being handled, the client has gone: it
cancels the connection's nursery, and with it the handler — this is how a disconnect reaches
the upstream call, streaming or not. A paused reader still notices: on Linux it waits on a
private epoll that reports only a hang-up (EPOLLRDHUP, EPOLLHUP, EPOLLERR) of the socket,
created when it pauses and closed when it goes on; elsewhere a disconnect is seen once the
pipelined bytes have been consumed.

The accept loop serves at most `max_connections` client connections at once (0: from the soft
RLIMIT_NOFILE at start: half of what is left once FD_RESERVE descriptors are set aside for lb's
own and for rejected connections, the other half being for connections to nodes). It takes up
to ACCEPT_BATCH waiting connections per pass of trio's scheduler, not one, so that they do not
queue in the kernel while lb is busy. A connection over the limit gets a prebuilt 503
(`too_many_connections`, `retry-after: 1`) and is closed, without an h11 parser or tasks of its
own; `HTTPServer.rejected_connections` counts them. Failing accepts (EMFILE and the like) are
logged and retried after 0.1 s.
"""

from __future__ import annotations

import contextlib
import email.utils
import http
import itertools
import logging
import os
import re
import resource
import select
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import attrs
import h11
import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, reschedule, wait_task_rescheduled

from lb.errors import BadRequest, InternalError, LBError, PayloadTooLarge, RequestTimeout
from lb.http import encoding
from lb.http.cors import CorsPolicy
from lb.http.errors import error_body, error_headers
from lb.http.headers import sendable
from lb.http.types import ClientGone, Handler, Headers, Request, Response
from lb.obs.logs import REQUEST_ID

log = logging.getLogger("lb.http")

READ_SIZE = 65536
# How many received bytes may wait unparsed in h11 (a pipelined next request, mostly) before
# the reader stops reading until they are consumed (watching only for a hang-up meanwhile).
MAX_PIPELINED_BYTES = 256 * 1024
LINGER_SECS = 1.0
# After the drain's grace, a writer that asked to be told (cancel_on_drain) gets this long to
# end its answer properly (a stream's error event) before its connection is cancelled.
DRAIN_FINISH_SECS = 1.0
# Connections turned away over max_connections linger (to deliver their 503 intact) only while
# fewer than this many do; past it they are closed at once, so a flood cannot use up the fds.
MAX_LINGERING_REJECTS = 64
# Descriptors the default connection limit leaves for lb's own (stdio, epoll, listeners, logs,
# health checks, Redis, a /metrics scrape: 64) and for the connections it turns away, which hold
# theirs while they linger: so that a client connection at the limit still finds a descriptor
# for its node, and accepts do not fail with EMFILE.
FD_RESERVE = 64 + MAX_LINGERING_REJECTS
# Connections taken from the kernel's accept queue in one go, without a trip to the scheduler.
ACCEPT_BATCH = 64
# A client's x-request-id is echoed on the answer and written to logs: visible ASCII only.
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")


@attrs.frozen
class ServerLimits:
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 16 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0  # the whole body, however it is dripped
    send_timeout: float = 60.0  # one blocked write to the client
    max_connections: int = 0  # client connections at once; 0: from RLIMIT_NOFILE
    keepalive_timeout: float = 30.0


class _ClientGone(Exception):
    """The client closed its side before its response was complete."""


class _Timeout(Exception):
    """The client was too slow sending its request (the message, if any, says how)."""


@attrs.define(eq=False)
class _Connection:
    """One connection's state, shared by its reader and its keep-alive loop."""

    stream: trio.SocketStream
    h11: h11.Connection
    client: str
    send_timeout: float
    # Set by the keep-alive loop while a handler runs or its response is sent: the reader
    # cancels the connection if the client goes away then.
    in_request: bool = False
    eof: bool = False  # the reader saw EOF or a reset (h11 has been told)
    linger: bool = False  # an error answer went out: linger before closing
    broken: bool = False  # a write was cut off: never write again
    fd: int = attrs.field(init=False)
    idle_scope: trio.CancelScope | None = None  # waiting for a request: drain cancels this
    drain_scope: trio.CancelScope | None = None  # the writer's: the drain's end cancels it
    _waiter: Task | None = None  # the keep-alive loop, waiting for the reader
    # The reader, waiting for the buffer to drain: parked (a Task), or watching for a hang-up
    # in a cancel scope that poll() cancels to let it go on.
    _paused: Task | trio.CancelScope | None = None
    _unchecked: int = 0  # bytes fed to h11 since its buffer was last measured

    def __attrs_post_init__(self) -> None:
        self.fd = self.stream.socket.fileno()

    async def send(self, *events: Any) -> None:
        send = self.h11.send
        data = b"".join([send(event) or b"" for event in events if event is not None])
        if data:  # the end of a Content-Length body is b"": no need for a trip to the scheduler
            await self.write(data)

    async def write(self, data: bytes) -> None:
        """Write to the client: straight to the socket when it takes everything (the common
        case costs one syscall and no cancel scope); else wait for room, each wait no longer
        than send_timeout. A write that was cut off leaves the connection `broken`: no byte
        may follow half a chunk, so nothing more is written and the connection is closed."""
        if self.broken:
            raise ClientGone("an earlier write to this client was cut off")
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.broken = True
            raise ClientGone(f"writing to the client failed: {exc.strerror}") from None
        if sent < len(data):
            await self._write_slowly(memoryview(data)[sent:])

    async def _write_slowly(self, rest: memoryview) -> None:
        """The rest of a write the socket could not take at once; send_timeout bounds each
        wait for the client to make room, not the whole transfer (a slow reader of a large
        answer is not a stalled one)."""
        self.broken = True  # until every byte is out (a cancel may cut this write short)
        sock = self.stream.socket
        while rest:
            with trio.move_on_after(self.send_timeout) as scope:
                try:
                    sent = await sock.send(rest)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    raise ClientGone("the client went away during a write") from None
            if scope.cancelled_caught:
                raise ClientGone(f"the client read nothing for {self.send_timeout:g}s")
            rest = rest[sent:]
        self.broken = False

    def poll(self) -> Any:
        """h11's next event, or NEED_DATA; lets a paused reader go on when it may."""
        event = self.h11.next_event()
        if self._paused is not None and (
            event is h11.NEED_DATA or len(self.h11.trailing_data[0]) <= MAX_PIPELINED_BYTES
        ):
            paused, self._paused = self._paused, None
            if isinstance(paused, trio.CancelScope):
                paused.cancel()
            else:
                reschedule(paused)
        return event

    async def next_event(self, deadline: float) -> Any:
        """The next h11 event, waiting for the reader as needed until `deadline`."""
        while True:
            event = self.poll()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_at(deadline):
                await self.wait_data()
                continue
            raise _Timeout

    async def wait_data(self) -> None:
        """Wait until the reader has fed h11 more data or EOF (call when h11 needs data)."""
        self._waiter = current_task()
        await wait_task_rescheduled(self._abort_wait)

    def _abort_wait(self, _: RaiseCancelT) -> Abort:
        self._waiter = None
        return Abort.SUCCEEDED

    def is_idle(self) -> bool:
        """Nothing of a next request has arrived (call when h11 needs data)."""
        return not self.eof and not self.h11.trailing_data[0]

    def has_buffered_bytes(self) -> bool:
        data, closed = self.h11.trailing_data
        return bool(data) or closed

    async def read_loop(self, connection_scope: trio.CancelScope) -> None:
        """Feed h11 until EOF. Waiting for readability first (rather than trying a read that
        would mostly fail with EAGAIN) costs one epoll registration per arrival and no more."""
        fd = self.stream.socket.fileno()
        parser = self.h11
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:  # reset by the client
                data = b""
            parser.receive_data(data)
            if not data:
                self.eof = True
                if self.in_request:
                    connection_scope.cancel()
                else:
                    self._wake()
                return
            self._wake()
            # The buffer is measured (a copy) only when it may have outgrown the limit.
            self._unchecked += len(data)
            if self._unchecked > MAX_PIPELINED_BYTES:
                self._unchecked = len(parser.trailing_data[0])
                if self._unchecked > MAX_PIPELINED_BYTES:
                    if not await self._pause(fd):
                        connection_scope.cancel()  # the client left during a request
                        return
                    self._unchecked = MAX_PIPELINED_BYTES  # measure again after the next read

    async def _pause(self, fd: int) -> bool:
        """Stop reading until the keep-alive loop has consumed the buffer; False if the client
        hung up meanwhile during a request (the caller cancels the connection).

        Where epoll exists the reader watches a private one for a hang-up of the socket while
        it waits. A hang-up outside a request marks the client gone (its next request is not
        handled), and the reader then waits as before, to read what is left and the EOF."""
        watch = _hangup_watch(fd)
        if watch is not None:
            with watch, trio.CancelScope() as resume:
                self._paused = resume
                while True:
                    await trio.lowlevel.wait_readable(watch.fileno())
                    if watch.poll(0):
                        break
            if self._paused is not resume:
                return True  # poll() let it go on (perhaps as the hang-up came)
            self._paused = None
            self.eof = True
            if self.in_request:
                return False
        self._paused = current_task()
        await wait_task_rescheduled(self._abort_pause)
        return True

    def _wake(self) -> None:
        task = self._waiter
        if task is not None:
            self._waiter = None
            reschedule(task)

    def _abort_pause(self, _: RaiseCancelT) -> Abort:
        self._paused = None
        return Abort.SUCCEEDED


def _hangup_watch(fd: int) -> select.epoll | None:
    """A new epoll reporting only a hang-up of `fd` (the peer's FIN, a hang-up, an error such
    as a reset; not data), or None where there is none to be had."""
    if not hasattr(select, "epoll"):
        return None
    try:
        watch = select.epoll()
    except OSError:  # out of file descriptors: pause without watching
        return None
    try:
        watch.register(fd, select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
    except OSError:
        watch.close()
        return None
    return watch


class HTTPServer:
    """Serves `handler` on listeners until drained."""

    def __init__(
        self, handler: Handler, limits: ServerLimits | None = None, cors: CorsPolicy | None = None
    ) -> None:
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.cors = cors
        self.draining = False
        self.drain_deadline: float | None = None
        # Client connections being served, the most at once (set by serve(), 0: no limit), and
        # how many were turned away with 503 over it.
        self.open_connections = 0
        self.connection_limit = 0
        self.rejected_connections = 0
        self._too_many = b""  # the prebuilt 503
        self._lingering_rejects = 0
        self._accept_scope: trio.CancelScope | None = None
        self._connections_scope: trio.CancelScope | None = None
        self._connections: set[_Connection] = set()
        self._listeners: list[trio.SocketListener] = []
        # Request ids: a random prefix per process and a counter (no syscall per request).
        # Shaped as a UUID: some nodes (llama-cpp-python) refuse any other x-request-id.
        self._id_prefix = str(uuid.uuid4())[:24]
        self._ids = itertools.count(1)

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):012x}"

    async def serve_tcp(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on host:port and serve; `nursery.start` returns the bound port."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        await self.serve(listeners, task_status=task_status)

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._listeners = list(listeners)
        self.connection_limit = connection_limit(self.limits.max_connections)
        self._too_many = _too_many_connections(self.connection_limit)
        try:
            async with trio.open_nursery() as connections:
                self._connections_scope = connections.cancel_scope
                with trio.CancelScope() as accept_scope:
                    self._accept_scope = accept_scope
                    port = self._listeners[0].socket.getsockname()[1]
                    async with trio.open_nursery() as accepts:
                        for listener in self._listeners:
                            accepts.start_soon(self._accept_loop, listener, connections)
                        task_status.started(port)
                # Closing the listening sockets makes new connections fail at once.
                self._close_listeners()
        finally:
            self._close_listeners()

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.socket.close()

    @property
    def ports(self) -> list[int]:
        return [listener.socket.getsockname()[1] for listener in self._listeners]

    def drain(self, timeout: float) -> None:
        """Stop accepting, close idle connections, give requests in flight `timeout` seconds."""
        self.draining = True
        self.drain_deadline = trio.current_time() + timeout
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        if self._connections_scope is not None:
            self._connections_scope.deadline = self.drain_deadline + DRAIN_FINISH_SECS
        for conn in self._connections:
            if conn.idle_scope is not None:
                conn.idle_scope.cancel()
            if conn.drain_scope is not None:
                conn.drain_scope.deadline = min(conn.drain_scope.deadline, self.drain_deadline)

    def stop(self) -> None:
        """Cancel everything now."""
        self.draining = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        if self._connections_scope is not None:
            self._connections_scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        # trio's accept takes one connection per pass of its scheduler: with thousands of
        # connections to run, that can be slower than they arrive, and they queue in the
        # kernel (their clients waiting). So after each accept, take what else is waiting
        # (up to ACCEPT_BATCH) with plain non-blocking accepts on the same descriptor.
        ready = socket.socket(fileno=listener.socket.fileno())
        ready.setblocking(False)  # whatever socket.setdefaulttimeout says: never wait here
        try:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of file descriptors and the like: wait and keep serving the others.
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                self._start(stream, nursery)
                for _ in range(ACCEPT_BATCH - 1):
                    try:
                        sock, _addr = ready.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        break
                    except OSError:
                        break  # EMFILE and the like: the awaited accept above reports it
                    self._start(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), nursery)
        finally:
            ready.detach()  # the descriptor is the listener's: never closed through this one

    def _start(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        """Serve an accepted connection, or turn it away over the limit."""
        if 0 < self.connection_limit <= self.open_connections:
            self.rejected_connections += 1
            nursery.start_soon(self._reject, stream)
            return
        self.open_connections += 1  # counted here, so that the next accept sees it
        nursery.start_soon(self._serve_connection, stream)

    async def _reject(self, stream: trio.SocketStream) -> None:
        """Answer the prebuilt 503 on a connection over the limit, and close it (after a
        linger, while few others linger, so that unread request bytes do not turn the close
        into a reset that destroys the answer)."""
        try:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(self._too_many)
                if self._lingering_rejects < MAX_LINGERING_REJECTS:
                    self._lingering_rejects += 1
                    try:
                        await _linger(stream)
                    finally:
                        self._lingering_rejects -= 1
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        """Serve one connection; the accept loop has counted it in open_connections."""
        try:
            peer = stream.socket.getpeername()
            client = f"{peer[0]}:{peer[1]}"
        except OSError:
            client = "?"
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        conn = _Connection(stream, parser, client, self.limits.send_timeout)
        self._connections.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.read_loop, nursery.cancel_scope)
                # The client going away is routine.
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, _ClientGone, ClientGone
                ):
                    await self._keepalive_loop(conn)
                nursery.cancel_scope.cancel()  # the reader
            if conn.linger:
                await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("connection %s failed", client)
        finally:
            self._connections.discard(conn)
            try:
                await trio.aclose_forcefully(stream)
            finally:
                self.open_connections -= 1

    async def _keepalive_loop(self, conn: _Connection) -> None:
        first = True
        while not self.draining or conn.has_buffered_bytes():
            request = await self._read_request(conn, first)
            if request is None:
                return
            first = False
            keep_going = await self._respond(conn, request)
            if not keep_going:
                return
            conn.h11.start_next_cycle()

    async def _read_request(self, conn: _Connection, first: bool) -> Request | None:
        """Read one request, or answer the error and return None (the connection then closes)."""
        limits = self.limits
        head_only = False
        try:
            event = conn.poll()
            if event is h11.NEED_DATA:
                # The head must be complete header_timeout after the connection opened (first
                # request), or after the first byte of a kept-alive request.
                start = trio.current_time()
                if conn.is_idle():
                    # Idle: a new connection gets the header timeout, a kept-alive one the
                    # keep-alive timeout; draining cancels the wait.
                    wait = limits.header_timeout if first else limits.keepalive_timeout
                    with trio.move_on_at(start + wait) as idle:
                        conn.idle_scope = idle
                        try:
                            await conn.wait_data()
                        finally:
                            conn.idle_scope = None
                    if idle.cancelled_caught:
                        if first and not self.draining:
                            await self._send_error(
                                conn, RequestTimeout("Timed out waiting for the request")
                            )
                        return None
                    if not first:
                        start = trio.current_time()
                event = await conn.next_event(start + limits.header_timeout)
            if isinstance(event, h11.ConnectionClosed):
                return None
            assert isinstance(event, h11.Request)
            head_only = event.method == b"HEAD"
            return await self._read_body(conn, event)
        except _Timeout as exc:
            message = str(exc) or "Timed out reading the request"
            await self._send_error(conn, RequestTimeout(message), head_only)
            return None
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == 431:
                message = _header_too_large(limits.max_header_bytes)
            else:
                message = f"Malformed request: {exc}"
            code = "request_header_fields_too_large" if status == 431 else "malformed_request"
            await self._send_error(
                conn, LBError(message, status=status, code=code), head_only
            )
            return None
        except LBError as exc:
            await self._send_error(conn, exc, head_only)
            return None

    async def _read_body(self, conn: _Connection, head: h11.Request) -> Request:
        max_body = self.limits.max_body_bytes
        headers = _header_list(head)
        length = _check_head(head, headers, self.limits.max_header_bytes)
        if length is not None and length > max_body:
            raise PayloadTooLarge(_too_large(max_body))
        if conn.h11.they_are_waiting_for_100_continue:
            await conn.send(h11.InformationalResponse(status_code=100, headers=[]))
        chunks: list[bytes] = []
        size = 0
        # Each wait for body bytes is bounded by the header timeout, and the whole body by the
        # body timeout, counted from the first wait (the head has just been parsed then). A body
        # that has already arrived with its head is read without looking at the clock.
        body_end: float | None = None
        while True:
            event = conn.poll()
            if event is h11.NEED_DATA:
                now = trio.current_time()
                if body_end is None:
                    body_end = now + self.limits.body_timeout
                deadline = now + self.limits.header_timeout
                whole_body = deadline >= body_end
                with trio.move_on_at(body_end if whole_body else deadline):
                    await conn.wait_data()
                    continue
                if whole_body:
                    raise _Timeout(_body_too_slow(self.limits.body_timeout))
                raise _Timeout
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_body:
                    raise PayloadTooLarge(_too_large(max_body))
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise _ClientGone
        body = b"".join(chunks)
        coding = _header(headers, b"content-encoding")
        if coding is not None:  # decoded here, so the handler and the nodes see plain JSON
            body = await encoding.decode_off_loop(body, coding, max_body)
            headers = [item for item in headers if item[0] != b"content-encoding"]
        target = head.target.decode("latin-1")
        path, _, query = target.partition("?")
        return Request(
            method=head.method.decode("ascii"),
            path=path,
            query=query,
            headers=headers,
            body=body,
            client=conn.client,
        )

    async def _respond(self, conn: _Connection, request: Request) -> bool:
        """Run the handler and send its response; True if the connection can be reused.

        While this runs, the reader cancels the connection if the client goes away."""
        if conn.eof:
            raise _ClientGone  # it left (or half-closed) before its request was handled
        conn.in_request = True
        try:
            await self._run_handler(_Sink(self, conn, request.method == "HEAD"), request)
        except ClientGone:
            return False  # nothing more can be written: close
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _ClientGone from None
        except Exception:
            # The handler's own errors became responses: this is a stream writer failing
            # after the head went out (or a response h11 refused). Closing the connection
            # without the last chunk tells the client the body is incomplete.
            log.exception("response to %s %s failed", request.method, request.path)
            return False
        finally:
            conn.in_request = False
            conn.drain_scope = None
            REQUEST_ID.set(None)
        return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE

    async def _run_handler(self, sink: _Sink, request: Request) -> None:
        """The handler's answer through the sink; an LBError before the head went out becomes
        the OpenAI error answer (with lb's headers)."""
        body = b""
        try:
            request.request_id = self._request_id(request)
            REQUEST_ID.set(request.request_id)  # every log line of the request carries it
            sink.tag(b"x-request-id", request.request_id.encode())
            if self.cors is not None and (preflight := self._cors(sink, request)) is not None:
                response = preflight
            else:
                response = await self.handler(request)
            if response.stream is None:
                body = response.body
                sink.head(response.status, [*response.headers, _content_length(body)])
            else:
                sink.head(response.status, response.headers)
                await response.stream(sink)
        except LBError as exc:
            if sink.committed:
                raise
            body = error_body(exc)
            sink.head(exc.status, error_headers(exc, body))
        except ClientGone:
            raise
        except Exception:
            if sink.committed:
                raise
            log.exception("handler failed for %s %s", request.method, request.path)
            error = InternalError("Internal error in lb")
            body = error_body(error)
            sink.head(error.status, error_headers(error, body))
        await sink.end(body)

    def _cors(self, sink: _Sink, request: Request) -> Response | None:
        """Tag an allowed origin's answer; a preflight's answer, if this is one."""
        assert self.cors is not None
        allowed = self.cors.allow(request.header(b"origin"))
        if allowed is None:
            return None
        for name, value in self.cors.tags(allowed):
            sink.tag(name, value)
        if request.method == "OPTIONS" and request.header(b"access-control-request-method"):
            return self.cors.preflight(request)
        return None

    def _request_id(self, request: Request) -> str:
        """The client's x-request-id if it is safe to echo and log, else a new one; a bad one is
        refused (400), never reflected."""
        value = request.header(b"x-request-id")
        if value is None:
            return self.new_request_id()
        if _REQUEST_ID.fullmatch(value) is None:
            raise BadRequest(
                "x-request-id must be 1 to 128 visible ASCII characters",
                code="invalid_header", param="x-request-id",
            )
        return value.decode("ascii")

    async def _send_error(
        self, conn: _Connection, error: LBError, head_only: bool = False
    ) -> None:
        """Answer an error on a connection that is about to close, if h11 still allows it; the
        connection then lingers before it closes."""
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = error_body(error)
        headers = [
            *error_headers(error, body),
            (b"x-request-id", self.new_request_id().encode()),
            (b"date", _http_date()),
            (b"connection", b"close"),
        ]
        try:
            await conn.send(
                h11.Response(
                    status_code=error.status, headers=headers, reason=_reason(error.status)
                ),
                None if head_only else h11.Data(data=body),
                h11.EndOfMessage(),
            )
            conn.linger = True
        except (ClientGone, h11.LocalProtocolError):
            pass


class _Sink:
    """The server's ResponseSink for one request (see lb.http.types.ResponseSink)."""

    __slots__ = (
        "_chunked", "_conn", "_head_only", "_headers", "_server", "_status", "_tags", "committed",
    )

    def __init__(self, server: HTTPServer, conn: _Connection, head_only: bool) -> None:
        self._server = server
        self._conn = conn
        self._head_only = head_only  # HEAD: the head of a GET, and no body (h11 sends none)
        self._status = 200
        self._headers: Headers = []
        self._tags: dict[bytes, bytes] = {}  # lb's own headers, by name (the last one wins)
        self._chunked = False  # the body goes out in chunks (h11 chose it for the head)
        self.committed = False

    def head(self, status: int, headers: Headers) -> None:
        if self.committed:
            raise RuntimeError("the response head already went out")
        self._status = status
        self._headers = headers

    def tag(self, name: bytes, value: bytes) -> None:
        self._tags[name] = value

    async def send(self, data: bytes) -> None:
        if not self.committed:
            out = self._commit()
            if data and not self._head_only:
                out += self._body(data)
        elif data and not self._head_only:
            out = self._body(data)
        else:
            return
        await self._conn.write(out)

    def _commit(self) -> bytes:
        """The head's bytes; h11 learns of it (its state, keep-alive and body framing)."""
        headers, status, reason = self._head(), self._status, _reason(self._status)
        parser = self._conn.h11
        if not sendable(headers):  # h11 checks each header, and says what is wrong
            head: bytes = parser.send(h11.Response(
                status_code=status, headers=headers, reason=reason))
        else:
            # h11 sees only the headers that frame the body or end the connection, since for
            # a body of unknown length it rebuilds and re-validates the whole list (twice);
            # lb writes the rest, checked, between h11's status line and h11's own headers.
            framing, lines = [], []
            for item in headers:
                if item[0].lower() in _FRAMING:
                    framing.append(item)
                else:
                    lines.append(b"%s: %s\r\n" % item)
            head = parser.send(h11.Response(
                status_code=status, headers=framing, reason=reason, _parsed=True))
            line, _, rest = head.partition(b"\r\n")
            head = b"%s\r\n%s%s" % (line, b"".join(lines), rest)
        self.committed = True
        # h11 adds this header itself when it chose chunks for a body of unknown length (an
        # HTTP/1.1 client, no Content-Length); lb's own heads never carry Transfer-Encoding.
        self._chunked = b"\r\ntransfer-encoding: chunked\r\n" in head.lower()
        return head

    def _body(self, data: bytes) -> bytes:
        """Body bytes framed for the wire. In chunks, framed here: h11 writes exactly this and
        keeps no state for it, but its event and state machine cost ~28K instructions a
        stream event; any other framing (Content-Length counts, HTTP/1.0) is h11's."""
        if self._chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        out: bytes = self._conn.h11.send(h11.Data(data=data))
        return out

    def cancel_on_drain(self, scope: trio.CancelScope) -> None:
        conn = self._conn
        conn.drain_scope = scope
        deadline = self._server.drain_deadline
        if deadline is not None:
            scope.deadline = min(scope.deadline, deadline)

    async def end(self, data: bytes = b"") -> None:
        """The last bytes of the body and the end of the message, in one write."""
        parser = self._conn.h11
        out = b""
        if not self.committed:
            out = self._commit()
        if data and not self._head_only:
            out += self._body(data)
        out += parser.send(h11.EndOfMessage()) or b""
        if out:
            await self._conn.write(out)

    def _head(self) -> Headers:
        """The recorded head without the headers lb sets itself, then lb's (and a Date, if the
        answer has none); while draining, the connection closes after this answer."""
        tags = self._tags
        has_date = False
        headers = []
        for item in self._headers:
            if item[0] not in tags:
                headers.append(item)
                has_date = has_date or item[0] == b"date"
        headers += tags.items()
        if not has_date:
            headers.append((b"date", _http_date()))
        if self._server.draining:
            headers.append((b"connection", b"close"))
        return headers


def _reason(status: int) -> bytes:
    """The status line's reason phrase (`200 OK`, not `200 `): some clients print or check it."""
    try:
        return _REASONS[status]
    except KeyError:
        return b""


# What h11 must see of a head to frame its body and to know whether the connection ends.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}
_date_cache: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """The Date header's value, formatted at most once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def _header_list(head: h11.Request) -> Headers:
    """The request's headers as a plain list of (lower-case name, value): built from
    `raw_items()`, since iterating h11's `Headers` itself goes item by item through
    `Sequence.__iter__` (a method call per header and an IndexError at the end)."""
    return [(name.lower(), value) for name, value in head.headers.raw_items()]


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _content_length(body: bytes) -> tuple[bytes, bytes]:
    return (b"content-length", str(len(body)).encode())


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then read and drop what the client still sends for a moment, so that the
    kernel does not answer unread request bytes with a reset that destroys our response."""
    await stream.send_eof()
    with trio.move_on_after(LINGER_SECS):
        while await stream.receive_some(READ_SIZE):
            pass


def _check_head(
    head: h11.Request, headers: list[tuple[bytes, bytes]], max_header_bytes: int
) -> int | None:
    """The request's Content-Length, after checking the size and framing of its head.

    h11 enforces max_header_bytes only while a head is incomplete, so a head that arrives
    whole in one read is measured here (request line and header lines, as sent).
    """
    size = len(head.method) + len(head.target) + 13
    length = None
    chunked = False
    for name, value in headers:  # iterating the list is much cheaper than h11's Headers
        size += len(name) + len(value) + 4
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    if size > max_header_bytes:
        raise LBError(
            _header_too_large(max_header_bytes), status=431,
            code="request_header_fields_too_large",
        )
    if chunked and length is not None:
        # h11 would go by Transfer-Encoding; such requests are a smuggling vector (RFC 9112 6.1).
        raise BadRequest(
            "Malformed request: both Content-Length and Transfer-Encoding",
            code="malformed_request",
        )
    return length


def connection_limit(max_connections: int) -> int:
    """Client connections to serve at once: `max_connections`, or when that is 0 what the soft
    RLIMIT_NOFILE leaves for them once FD_RESERVE descriptors are set aside: half the rest
    (the other half is for their connections to nodes); 0 means no limit."""
    if max_connections > 0:
        return max_connections
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        return 0
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 0
    return max(1, (soft - min(FD_RESERVE, soft // 4)) // 2)


def _too_many_connections(limit: int) -> bytes:
    """The whole 503 answer to a connection over the limit, built once per server."""
    error = LBError(
        f"lb is serving as many client connections as it may ({limit}); retry shortly",
        status=503, code="too_many_connections", retry_after=1,
    )
    body = error_body(error)
    headers = [*error_headers(error, body), (b"connection", b"close")]
    lines = [name + b": " + value for name, value in headers]
    return b"\r\n".join([b"HTTP/1.1 503 Service Unavailable", *lines, b"", body])


def _body_too_slow(limit: float) -> str:
    return f"Request body did not arrive within {limit:g} seconds"


def _header_too_large(limit: int) -> str:
    return f"Request header block is larger than {limit} bytes"


def _too_large(limit: int) -> str:
    return f"Request body is larger than the limit of {limit} bytes"
