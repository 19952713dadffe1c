"""lb.upstream.client against small real servers on 127.0.0.1 (h11 or raw bytes)."""

from __future__ import annotations

import errno
import os
import resource
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import h11
import orjson
import pytest
import trio

from lb.upstream.client import (
    _COALESCE_LIMIT,
    BodyTooLarge,
    ConnectError,
    ConnectionPool,
    LocalResourceError,
    PoolClosed,
    UpstreamClosed,
    UpstreamProtocolError,
    _local_resource_problem,
)

Handler = Callable[[trio.abc.Stream, "Server"], Awaitable[None]]
# (method, target, headers, body) -> (status, headers, body)
Reply = tuple[int, list[tuple[bytes, bytes]], bytes]
Respond = Callable[[h11.Request, bytes], Awaitable[Reply]]


class Server:
    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self.requests: list[tuple[h11.Request, bytes]] = []

    def url(self, scheme: str = "http", prefix: str = "") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{prefix}"


@asynccontextmanager
async def serve(
    handler: Handler, ssl_context: ssl.SSLContext | None = None, rcvbuf: int | None = None
) -> AsyncIterator[Server]:
    """`rcvbuf`: SO_RCVBUF of the listening socket (inherited by accepted ones), so a node
    that stops reading blocks the client's send sooner."""
    server = Server()

    async def on_connection(stream: trio.abc.Stream) -> None:
        server.accepted += 1
        await handler(stream, server)

    async with trio.open_nursery() as nursery:
        if rcvbuf is not None:
            assert ssl_context is None
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before listen()
            await sock.bind(("127.0.0.1", 0))
            sock.listen()
            await nursery.start(trio.serve_listeners, on_connection, [trio.SocketListener(sock)])
            server.port = sock.getsockname()[1]
        elif ssl_context is None:
            listeners = await nursery.start(
                partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1")
            )
            server.port = listeners[0].socket.getsockname()[1]
        else:
            listeners = await nursery.start(
                partial(trio.serve_ssl_over_tcp, on_connection, 0, ssl_context, host="127.0.0.1")
            )
            server.port = listeners[0].transport_listener.socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


async def read_request(
    stream: trio.abc.Stream, conn: h11.Connection
) -> tuple[h11.Request, bytes] | None:
    """One request off `conn`, or None if the client closed the connection."""
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, body
        elif isinstance(event, h11.ConnectionClosed):
            return None
        else:
            raise AssertionError(event)


def h11_handler(respond: Respond) -> Handler:
    """A keep-alive HTTP/1.1 server that answers every request with `respond`."""

    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            got = await read_request(stream, conn)
            if got is None:
                return
            server.requests.append(got)
            status, headers, body = await respond(*got)
            headers = [*headers, (b"content-length", str(len(body)).encode())]
            data = conn.send(h11.Response(status_code=status, headers=headers))
            data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            try:
                await stream.send_all(data)
            except trio.BrokenResourceError:
                return
            if conn.our_state is h11.MUST_CLOSE:
                await stream.aclose()
                return
            conn.start_next_cycle()

    return handler


async def echo_json(request: h11.Request, body: bytes) -> Reply:
    payload = {
        "method": request.method.decode(),
        "target": request.target.decode(),
        "body": orjson.loads(body) if body else None,
    }
    return 200, [(b"content-type", b"application/json")], orjson.dumps(payload)


def raw_handler(chunks: list[bytes], then_close: bool = True) -> Handler:
    """Reads one request head, then writes `chunks` verbatim."""

    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        got = await read_request(stream, conn)
        if got is None:
            return
        for chunk in chunks:
            await stream.send_all(chunk)
        if then_close:
            await stream.aclose()
        else:
            await trio.sleep_forever()

    return handler


def hard_reset(stream: trio.abc.Stream) -> None:
    """Close with RST instead of FIN."""
    assert isinstance(stream, trio.SocketStream)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


JSON = [(b"content-type", b"application/json")]


def assert_stats(pool: ConnectionPool, *, idle: int, opened: int, retries: int = 0) -> None:
    stats = pool.stats()
    assert stats == {
        "idle": idle,
        "active": 0,
        "opened": opened,
        "closed": opened - idle,  # every connection not idle was closed, none leaked
        "retries": retries,
    }


async def test_get_and_post_json() -> None:
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json)) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("GET", "/v1/models", []) as resp:
                assert resp.status == 200
                assert resp.header(b"content-type") == b"application/json"
                assert orjson.loads(await resp.read()) == {
                    "method": "GET",
                    "target": "/v1/models",
                    "body": None,
                }
            body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            async with pool.request("POST", "/v1/chat/completions", JSON, body) as resp:
                assert resp.status == 200
                got = orjson.loads(await resp.read())
            assert got["method"] == "POST"
            assert got["body"] == orjson.loads(body)
            request, received = server.requests[1]
            assert received == body
            headers = dict(request.headers)
            assert headers[b"host"] == f"127.0.0.1:{server.port}".encode()
            assert headers[b"content-length"] == str(len(body)).encode()
            await pool.aclose()


async def test_client_sets_host_and_length_and_drops_hop_by_hop_headers() -> None:
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json)) as server:
            pool = ConnectionPool(server.url())
            headers = [
                (b"host", b"client-facing.example"),
                (b"content-length", b"999"),
                (b"connection", b"close"),
                (b"transfer-encoding", b"chunked"),
                (b"authorization", b"Bearer k"),
            ]
            async with pool.request("POST", "/x", headers, b"{}") as resp:
                await resp.read()
            request, body = server.requests[0]
            got = request.headers.raw_items()
            names = [name.lower() for name, _ in got]
            assert sorted(names) == [b"authorization", b"content-length", b"host"]
            assert dict(request.headers)[b"content-length"] == b"2"
            assert body == b"{}"
            assert pool.num_idle == 1  # the caller's "connection: close" was not forwarded


async def test_base_url_path_prefix() -> None:
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json)) as server:
            pool = ConnectionPool(server.url(prefix="/v1/"))
            async with pool.request("GET", "/models?x=1", []) as resp:
                assert orjson.loads(await resp.read())["target"] == "/v1/models?x=1"


def test_base_url_parsing() -> None:
    pool = ConnectionPool("http://10.0.0.1:8080/v1/")
    assert (pool.host, pool.port, pool._prefix, pool._host_header) == (
        "10.0.0.1",
        8080,
        "/v1",
        b"10.0.0.1:8080",
    )
    pool = ConnectionPool("https://api.example.com")
    assert (pool.port, pool._prefix, pool._host_header) == (443, "", b"api.example.com")
    pool = ConnectionPool("http://[::1]:9000")
    assert (pool.host, pool._host_header) == ("::1", b"[::1]:9000")
    assert ConnectionPool("http://h:80")._host_header == b"h"
    with pytest.raises(ValueError):
        ConnectionPool("ftp://h")
    with pytest.raises(ValueError):
        ConnectionPool("http:///path")


async def test_keep_alive_reuses_one_connection() -> None:
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json)) as server:
            pool = ConnectionPool(server.url())
            for _ in range(3):
                async with pool.request("GET", "/", []) as resp:
                    await resp.read()
                assert pool.num_idle == 1
            assert server.accepted == 1
            assert_stats(pool, idle=1, opened=1)
            await pool.aclose()
            assert_stats(pool, idle=0, opened=1)
            with pytest.raises(PoolClosed):
                pool.request("GET", "/", [])


async def test_request_in_a_cancelled_scope_is_never_sent() -> None:
    """The plain-TCP send writes straight to the socket, after a check for a cancel: a request
    whose scope was cancelled before it went out never reaches the node."""
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json)) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("POST", "/first", [], b"{}") as resp:
                await resp.read()
            with trio.CancelScope() as scope:
                scope.cancel()
                async with pool.request("POST", "/second", [], b"{}") as resp:
                    await resp.read()
            assert scope.cancelled_caught
            async with pool.request("POST", "/third", [], b"{}") as resp:
                await resp.read()
            assert [request.target for request, _ in server.requests] == [b"/first", b"/third"]
            await pool.aclose()


async def test_stale_idle_connection_is_detected_before_reuse() -> None:
    closed = trio.Event()

    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        got = await read_request(stream, conn)
        assert got is not None
        # keep-alive response (no "connection: close"), then hang up anyway
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.aclose()
        closed.set()

    with trio.fail_after(5):
        async with serve(handler) as server:
            pool = ConnectionPool(server.url())
            for _ in range(2):
                async with pool.request("GET", "/", []) as resp:
                    assert await resp.read() == b"ok"
                assert pool.num_idle == 1
                await closed.wait()
                closed = trio.Event()
                await trio.sleep(0.05)  # let the FIN arrive
            assert server.accepted == 2
            # found dead by the check on checkout, not by a failed attempt
            assert_stats(pool, idle=1, opened=2)


@pytest.mark.parametrize("reset", [False, True])
async def test_reused_connection_dropped_on_request_is_retried(reset: bool) -> None:
    # The first connection serves one request, stays open, then hangs up (FIN or RST) on
    # the second request without answering: the race the idle check cannot see.
    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        got = await read_request(stream, conn)
        assert got is not None
        body = b"conn %d" % server.accepted
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        if server.accepted == 1:
            assert await read_request(stream, h11.Connection(h11.SERVER)) is not None
            if reset:
                hard_reset(stream)
            else:
                await stream.aclose()
        else:
            await trio.sleep_forever()

    with trio.fail_after(5):
        async with serve(handler) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("POST", "/", JSON, b"{}") as resp:
                assert await resp.read() == b"conn 1"
            sent: list[None] = []
            async with pool.request(
                "POST", "/", JSON, b"{}", on_sent=lambda: sent.append(None)
            ) as resp:
                assert await resp.read() == b"conn 2"
            assert server.accepted == 2
            assert_stats(pool, idle=1, opened=2, retries=1)
            assert len(sent) == 2  # the dead connection took the whole request: sent twice


async def test_reused_connection_failing_to_send_is_retried() -> None:
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json)) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("GET", "/", []) as resp:
                await resp.read()
            # Our own write side shut: sending fails, yet nothing is readable, so only the
            # retry can save the request.
            pool._idle[0].sock.shutdown(socket.SHUT_WR)
            sent: list[None] = []
            async with pool.request(
                "POST", "/", JSON, b"{}", on_sent=lambda: sent.append(None)
            ) as resp:
                assert orjson.loads(await resp.read())["body"] == {}
            assert_stats(pool, idle=1, opened=2, retries=1)
            assert len(sent) == 1  # only the retry's send completed


async def test_fresh_connection_dropped_before_response_raises() -> None:
    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(stream, conn)
        await stream.aclose()

    with trio.fail_after(5):
        async with serve(handler) as server:
            pool = ConnectionPool(server.url())
            with pytest.raises(UpstreamClosed):
                async with pool.request("GET", "/", []):
                    pass
            assert server.accepted == 1  # no retry on a fresh connection
            assert_stats(pool, idle=0, opened=1)


async def test_reused_connection_that_answered_partially_is_not_retried() -> None:
    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(stream, conn)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await read_request(stream, h11.Connection(h11.SERVER))
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-")
        await stream.aclose()

    with trio.fail_after(5):
        async with serve(handler) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("GET", "/", []) as resp:
                await resp.read()
            with pytest.raises(UpstreamClosed):
                async with pool.request("GET", "/", []):
                    pass
            assert server.accepted == 1


async def test_chunked_response_streams_incrementally() -> None:
    second = trio.Event()

    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(stream, conn)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
            b"d\r\ndata: first\n\n\r\n"
        )
        await second.wait()
        await stream.send_all(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with serve(handler) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("POST", "/v1/chat/completions", JSON, b"{}") as resp:
                assert resp.status == 200
                assert await resp.receive_some() == b"data: first\n\n"
                second.set()
                assert await resp.receive_some() == b"data: second\n\n"
                assert await resp.receive_some() == b""
                assert await resp.receive_some() == b""
            assert pool.num_idle == 1


async def test_cancel_mid_body_closes_connection_at_once() -> None:
    peer_saw_close = trio.Event()

    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(stream, conn)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        try:
            data = await stream.receive_some(1)
        except trio.BrokenResourceError:
            data = b""
        assert data == b""
        peer_saw_close.set()

    with trio.fail_after(5):
        async with serve(handler) as server:
            pool = ConnectionPool(server.url())
            with trio.move_on_after(0.05) as scope:
                async with pool.request("GET", "/", []) as resp:
                    assert await resp.receive_some() == b"hello"
                    await resp.receive_some()  # never comes
            assert scope.cancelled_caught
            assert_stats(pool, idle=0, opened=1)
            with trio.fail_after(1):
                await peer_saw_close.wait()


@pytest.mark.parametrize("size", [0, 300_000], ids=["no-body", "large-body"])
async def test_cancel_while_waiting_for_headers_closes_connection(size: int) -> None:
    peer_saw_close = trio.Event()
    scope = trio.CancelScope()

    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(stream, conn)
        scope.cancel()  # the whole request is here: the client waits for the head
        try:
            data = await stream.receive_some(1)
        except trio.BrokenResourceError:
            data = b""
        assert data == b""
        peer_saw_close.set()

    sent: list[None] = []
    with trio.fail_after(5):
        async with serve(handler) as server:
            pool = ConnectionPool(server.url())
            with scope:
                async with pool.request(
                    "POST" if size else "GET",
                    "/",
                    [],
                    b"x" * size,
                    on_sent=lambda: sent.append(None),
                ):
                    raise AssertionError("no response was sent")
            assert scope.cancelled_caught
            assert len(sent) == 1
            assert_stats(pool, idle=0, opened=1)
            with trio.fail_after(1):
                await peer_saw_close.wait()


async def test_unread_body_or_exception_closes_connection() -> None:
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json)) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("GET", "/", []) as resp:
                assert resp.status == 200  # body left unread
            assert_stats(pool, idle=0, opened=1)
            with pytest.raises(KeyError):
                async with pool.request("GET", "/", []) as resp:
                    await resp.read()
                    raise KeyError("caller failed")
            assert_stats(pool, idle=0, opened=2)
            assert server.accepted == 2
            with pytest.raises(Exception, match="context was left"):
                await resp.receive_some()


async def test_connection_close_response_is_not_pooled() -> None:
    async def respond(request: h11.Request, body: bytes) -> Reply:
        return 200, [(b"connection", b"close")], b"bye"

    with trio.fail_after(5):
        async with serve(h11_handler(respond)) as server:
            pool = ConnectionPool(server.url())
            for _ in range(2):
                async with pool.request("GET", "/", []) as resp:
                    assert await resp.read() == b"bye"
            assert_stats(pool, idle=0, opened=2)
            assert server.accepted == 2


async def test_connection_refused_raises_connect_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    pool = ConnectionPool(f"http://127.0.0.1:{port}")
    with trio.fail_after(5), pytest.raises(ConnectError):
        async with pool.request("GET", "/", []):
            pass
    assert_stats(pool, idle=0, opened=0)


async def test_unresolvable_host_raises_connect_error() -> None:
    pool = ConnectionPool("http://no-such-host.invalid:1")
    with trio.fail_after(10), pytest.raises(ConnectError):
        async with pool.request("GET", "/", []):
            pass


async def test_out_of_file_descriptors_raises_local_resource_error() -> None:
    # Real exhaustion: the soft RLIMIT_NOFILE is lowered to just above the descriptors in
    # use and filled up, so creating the socket to the (healthy) node fails with EMFILE.
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json)) as server:
            pool = ConnectionPool(server.url())
            socket.getaddrinfo("127.0.0.1", server.port)  # the first call imports a codec
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            fillers: list[socket.socket] = []
            try:
                highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
                resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
                with pytest.raises(OSError) as full:
                    while True:
                        fillers.append(socket.socket())
                assert full.value.errno == errno.EMFILE
                with pytest.raises(LocalResourceError, match="out of file descriptors") as info:
                    async with pool.request("GET", "/", []):
                        pass
            finally:
                for sock in fillers:
                    sock.close()
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert not isinstance(info.value, ConnectError)  # not the node's fault
            assert_stats(pool, idle=0, opened=0)
            async with pool.request("GET", "/", []) as resp:  # descriptors back: works again
                assert resp.status == 200
                await resp.read()
            assert server.accepted == 1


def attempts_failed(*errors: OSError) -> OSError:
    """What trio.open_tcp_stream raises when every connection attempt failed."""
    msg = "all attempts to connect to 10.0.0.1:80 failed"
    exc = OSError(msg)
    exc.__cause__ = ExceptionGroup(msg, list(errors))
    return exc


def with_context(exc: BaseException, context: BaseException) -> BaseException:
    exc.__context__ = context
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.EMFILE, "Too many open files"), "out of file descriptors (EMFILE"),
        (OSError(errno.ENFILE, "Too many open files in system"), "out of file descriptors"),
        (OSError(errno.ENOBUFS, "No buffer space available"), "out of memory (ENOBUFS"),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), "out of memory (ENOMEM"),
        (attempts_failed(OSError(errno.EMFILE, "x")), "EMFILE"),
        (
            attempts_failed(
                OSError(errno.ECONNREFUSED, "refused"), OSError(errno.ENOBUFS, "no buffers")
            ),
            "ENOBUFS",
        ),
        (with_context(trio.BrokenResourceError(), OSError(errno.ENOMEM, "x")), "ENOMEM"),
        (socket.gaierror(socket.EAI_MEMORY, "Memory allocation failure"), "EAI_MEMORY"),
        (OSError(errno.ECONNREFUSED, "Connection refused"), None),
        (attempts_failed(OSError(errno.ECONNREFUSED, "refused")), None),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), None),
        (OSError("no results found for hostname lookup"), None),
    ],
)
def test_local_resource_errors_are_told_apart(exc: BaseException, expected: str | None) -> None:
    got = _local_resource_problem(exc)
    if expected is None:
        assert got is None
    else:
        assert got is not None and expected in got


@pytest.mark.parametrize(
    "chunks",
    [
        [b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789"],
        [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n"],
    ],
    ids=["content-length", "chunked"],
)
async def test_server_drops_mid_body_raises_upstream_closed(chunks: list[bytes]) -> None:
    with trio.fail_after(5):
        async with serve(raw_handler(chunks)) as server:
            pool = ConnectionPool(server.url())
            with pytest.raises(UpstreamClosed):
                async with pool.request("GET", "/", []) as resp:
                    assert await resp.receive_some() == b"0123456789"
                    await resp.receive_some()
            assert_stats(pool, idle=0, opened=1)


async def test_server_reset_mid_body_raises_upstream_closed() -> None:
    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(stream, conn)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        await trio.sleep(0.05)
        hard_reset(stream)

    with trio.fail_after(5):
        async with serve(handler) as server:
            pool = ConnectionPool(server.url())
            with pytest.raises(UpstreamClosed):
                async with pool.request("GET", "/", []) as resp:
                    await resp.read()
            assert_stats(pool, idle=0, opened=1)


async def test_body_until_close() -> None:
    chunks = [b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n", b"part one, ", b"part two"]
    with trio.fail_after(5):
        async with serve(raw_handler(chunks)) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("GET", "/", []) as resp:
                assert await resp.read() == b"part one, part two"
            assert_stats(pool, idle=0, opened=1)


async def test_garbage_raises_protocol_error() -> None:
    with trio.fail_after(5):
        async with serve(raw_handler([b"SSH-2.0-OpenSSH\r\n\r\n"], then_close=False)) as server:
            pool = ConnectionPool(server.url())
            with pytest.raises(UpstreamProtocolError):
                async with pool.request("GET", "/", []):
                    pass
            assert_stats(pool, idle=0, opened=1)


async def test_informational_response_is_skipped() -> None:
    chunks = [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"]
    with trio.fail_after(5):
        async with serve(raw_handler(chunks, then_close=False)) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("POST", "/", JSON, b"{}") as resp:
                assert resp.status == 201
                assert await resp.read() == b"ok"


async def test_read_limit() -> None:
    big = b"x" * 1000

    async def respond(request: h11.Request, body: bytes) -> Reply:
        return 200, [], big

    chunked = [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        b"200\r\n" + big[:512] + b"\r\n",
        b"200\r\n" + big[:512] + b"\r\n0\r\n\r\n",
    ]
    with trio.fail_after(5):
        async with serve(h11_handler(respond)) as server:
            pool = ConnectionPool(server.url())
            with pytest.raises(BodyTooLarge):  # refused from content-length alone
                async with pool.request("GET", "/", []) as resp:
                    await resp.read(limit=999)
            async with pool.request("GET", "/", []) as resp:
                assert await resp.read(limit=1000) == big
            assert_stats(pool, idle=1, opened=2)
        async with serve(raw_handler(chunked, then_close=False)) as server:
            pool = ConnectionPool(server.url())
            with pytest.raises(BodyTooLarge):
                async with pool.request("GET", "/", []) as resp:
                    await resp.read(limit=1000)
            assert_stats(pool, idle=0, opened=1)


async def test_large_request_body() -> None:
    body = orjson.dumps({"prompt": "y" * 300_000})

    async def respond(request: h11.Request, received: bytes) -> Reply:
        return 200, [], str(len(received)).encode()

    with trio.fail_after(5):
        async with serve(h11_handler(respond)) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("POST", "/", JSON, body) as resp:
                assert await resp.read() == str(len(body)).encode()
            assert server.requests[0][1] == body


# --- early responses (RFC 9112 section 9.5) ------------------------------------------

TOO_LARGE = orjson.dumps({"error": {"message": "request body too large", "code": 413}})


def early_413_handler(close: bool) -> Handler:
    """Reads the request head only, answers 413 with a JSON body before reading any of the
    request body, then closes (`connection: close`; unread data makes that a RST) or keeps
    the socket open without ever reading again."""

    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        assert isinstance(event, h11.Request)
        server.requests.append((event, b""))
        await stream.send_all(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n%s\r\n%s"
            % (len(TOO_LARGE), b"connection: close\r\n" if close else b"", TOO_LARGE)
        )
        if close:
            await stream.aclose()
        else:
            await trio.sleep_forever()

    return handler


@pytest.mark.parametrize(
    "size",
    [_COALESCE_LIMIT, 8 << 20],
    ids=["64KiB-one-send", "8MiB-body-sent-apart"],
)
async def test_early_413_then_close_is_returned(size: int) -> None:
    # The node closes with the request body unread: its kernel answers our data with a RST
    # and our send fails. The 413 it sent first is what the caller must get, not an error.
    # 64 KiB goes out with the head in one send_all (no concurrent reader): the tiny receive
    # buffer makes that send block, so only reading what arrived after it failed saves it.
    sent: list[None] = []
    with trio.fail_after(10):
        async with serve(early_413_handler(close=True), rcvbuf=4096) as server:
            pool = ConnectionPool(server.url())
            async with pool.request(
                "POST", "/v1/completions", JSON, b"x" * size, on_sent=lambda: sent.append(None)
            ) as resp:
                assert resp.status == 413
                assert resp.header(b"content-type") == b"application/json"
                assert orjson.loads(await resp.read()) == orjson.loads(TOO_LARGE)
            assert sent == []  # the request was never all written
            assert dict(server.requests[0][0].headers)[b"content-length"] == b"%d" % size
            assert_stats(pool, idle=0, opened=1)


async def test_early_413_on_open_connection_is_returned_while_sending() -> None:
    # The node answers and then neither reads nor closes: the send would block forever.
    # The response head must cut it short, and the connection must not be pooled (the node
    # still expects the rest of the body on it).
    sent: list[None] = []
    with trio.fail_after(10):
        async with serve(early_413_handler(close=False)) as server:
            pool = ConnectionPool(server.url())
            body = b"x" * (8 << 20)
            async with pool.request(
                "POST", "/", JSON, body, on_sent=lambda: sent.append(None)
            ) as resp:
                assert resp.status == 413
                assert orjson.loads(await resp.read()) == orjson.loads(TOO_LARGE)
                assert resp.complete
            assert sent == []
            assert_stats(pool, idle=0, opened=1)
            # the next request opens a new connection
            async with pool.request("POST", "/", JSON, body) as resp:
                assert resp.status == 413
                await resp.read()
            assert server.accepted == 2
            assert_stats(pool, idle=0, opened=2)


async def test_response_after_the_whole_large_body_is_normal() -> None:
    # Watching for an early head must not disturb the ordinary case: a node that reads all
    # of a large body, then answers, keeps its connection in the pool.
    body = b"y" * (3 << 20)

    async def respond(request: h11.Request, received: bytes) -> Reply:
        return 200, [], b"%d" % len(received)

    with trio.fail_after(10):
        async with serve(h11_handler(respond)) as server:
            pool = ConnectionPool(server.url())
            for _ in range(2):
                async with pool.request("PUT", "/", [], body) as resp:
                    assert await resp.read() == b"%d" % len(body)
            assert server.accepted == 1
            assert_stats(pool, idle=1, opened=1)


async def test_early_response_on_reused_connection_is_not_retried() -> None:
    # An answer that came before the body was sent is the node's answer: no retry.
    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(stream, conn)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await early_413_handler(close=True)(stream, server)

    with trio.fail_after(10):
        async with serve(handler) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("GET", "/", []) as resp:
                assert await resp.read() == b"ok"
            async with pool.request("POST", "/", JSON, b"x" * (8 << 20)) as resp:
                assert resp.status == 413
                assert orjson.loads(await resp.read()) == orjson.loads(TOO_LARGE)
            assert server.accepted == 1
            assert_stats(pool, idle=0, opened=1)


async def test_garbage_while_sending_large_body_raises_protocol_error() -> None:
    # The watcher's verdict ends the send too: no hang on a node that never reads.
    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        assert await stream.receive_some(1)
        await stream.send_all(b"SSH-2.0-OpenSSH\r\n\r\n")
        await trio.sleep_forever()

    sent: list[None] = []
    with trio.fail_after(10):
        async with serve(handler) as server:
            pool = ConnectionPool(server.url())
            with pytest.raises(UpstreamProtocolError):
                async with pool.request(
                    "POST", "/", JSON, b"x" * (8 << 20), on_sent=lambda: sent.append(None)
                ):
                    pass
            assert sent == []
            assert_stats(pool, idle=0, opened=1)


async def test_cancel_while_sending_large_body_closes_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A node that reads nothing and says nothing: the caller's timeout ends the request
    # (sender and watcher both cancelled) and the node sees the connection close. The
    # timeout fires once every task is blocked, i.e. the send is stuck on full buffers.
    cancelled = trio.Event()
    peer_saw_close = trio.Event()

    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        assert await stream.receive_some(1)
        await cancelled.wait()  # read nothing more until the client gave up
        try:
            while await stream.receive_some(1 << 20):
                pass  # what was sent before the client closed
        except trio.BrokenResourceError:
            pass
        peer_saw_close.set()

    with trio.fail_after(100):
        async with serve(handler) as server:
            pool = ConnectionPool(server.url())
            sent: list[None] = []
            with trio.move_on_after(30) as scope:
                async with pool.request(
                    "POST", "/", JSON, b"x" * (8 << 20), on_sent=lambda: sent.append(None)
                ):
                    raise AssertionError("no response was sent")
            assert scope.cancelled_caught
            cancelled.set()
            assert sent == []
            assert_stats(pool, idle=0, opened=1)
            await peer_saw_close.wait()


# --- the on_sent hook ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, 300_000], ids=["no-body", "small", "large"])
async def test_on_sent_is_called_before_the_wait_for_the_head(size: int) -> None:
    # The node answers only once on_sent() was called: had the client waited for the head
    # first, this would deadlock.
    calls = 0
    sent = trio.Event()

    def on_sent() -> None:
        nonlocal calls
        calls += 1
        sent.set()

    async def respond(request: h11.Request, received: bytes) -> Reply:
        await sent.wait()
        return 200, [], b"%d" % len(received)

    with trio.fail_after(5):
        async with serve(h11_handler(respond)) as server:
            pool = ConnectionPool(server.url())
            method = "POST" if size else "GET"
            async with pool.request(method, "/", [], b"z" * size, on_sent=on_sent) as resp:
                assert calls == 1
                assert await resp.read() == b"%d" % size
            assert calls == 1


async def test_idle_timeout_and_max_idle() -> None:
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json)) as server:
            pool = ConnectionPool(server.url(), idle_timeout=0.05, max_idle=2)

            async def one() -> None:
                async with pool.request("GET", "/", []) as resp:
                    await resp.read()
                    await trio.sleep(0.01)  # keep all three in flight together

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(one)
            assert_stats(pool, idle=2, opened=3)
            await trio.sleep(0.1)
            await one()  # both idle ones expired: a new connection
            assert_stats(pool, idle=1, opened=4)


async def test_200_concurrent_requests() -> None:
    n = 200
    all_arrived = trio.Event()
    arrived = 0

    async def respond(request: h11.Request, body: bytes) -> Reply:
        nonlocal arrived
        arrived += 1
        if arrived == n:
            all_arrived.set()
        await all_arrived.wait()  # only answers once all n are in flight: no hidden cap
        return 200, [], body

    results: list[bytes] = []

    async def one(i: int, pool: ConnectionPool) -> None:
        async with pool.request("POST", "/", JSON, b"%d" % i) as resp:
            results.append(await resp.read())

    with trio.fail_after(10):
        async with serve(h11_handler(respond)) as server:
            pool = ConnectionPool(server.url())
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i, pool)
            assert sorted(results) == sorted(b"%d" % i for i in range(n))
            assert_stats(pool, idle=n, opened=n)
            # and they are all reused
            results.clear()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i, pool)
            assert len(results) == n
            assert server.accepted == n


async def test_tcp_nodelay_is_set() -> None:
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json)) as server:
            pool = ConnectionPool(server.url())
            async with pool.request("GET", "/", []) as resp:
                await resp.read()
            (conn,) = pool._idle
            assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# --- TLS -------------------------------------------------------------------------------

import trustme  # noqa: E402  (a test dependency; missing must fail, not skip)


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def test_tls_keep_alive(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json), server_ctx) as server:
            pool = ConnectionPool(server.url("https", "/v1"), ssl_context=client_ctx)
            for _ in range(3):
                async with pool.request("POST", "/chat", JSON, b'{"a": 1}') as resp:
                    got = orjson.loads(await resp.read())
                assert got == {"method": "POST", "target": "/v1/chat", "body": {"a": 1}}
            assert server.accepted == 1
            assert_stats(pool, idle=1, opened=1)


async def test_tls_untrusted_certificate_raises_connect_error(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, _ = tls
    with trio.fail_after(5):
        async with serve(h11_handler(echo_json), server_ctx) as server:
            pool = ConnectionPool(server.url("https"))  # system CAs don't know trustme's
            with pytest.raises(ConnectError):
                async with pool.request("GET", "/", []):
                    pass
            assert_stats(pool, idle=0, opened=1)


async def test_tls_stale_connection(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls

    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(stream, conn)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.aclose()

    with trio.fail_after(5):
        async with serve(handler, server_ctx) as server:
            pool = ConnectionPool(server.url("https"), ssl_context=client_ctx)
            for _ in range(3):
                async with pool.request("GET", "/", []) as resp:
                    assert await resp.read() == b"ok"
                await trio.sleep(0.05)
            assert server.accepted == 3
            assert pool.retries == 0  # close_notify + FIN seen by the check on checkout


async def test_tls_early_response_while_sending(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls
    sent: list[None] = []
    with trio.fail_after(10):
        async with serve(early_413_handler(close=False), server_ctx) as server:
            pool = ConnectionPool(server.url("https"), ssl_context=client_ctx)
            async with pool.request(
                "POST", "/", JSON, b"x" * (8 << 20), on_sent=lambda: sent.append(None)
            ) as resp:
                assert resp.status == 413
                assert orjson.loads(await resp.read()) == orjson.loads(TOO_LARGE)
            assert sent == []
            assert_stats(pool, idle=0, opened=1)
