"""lb.http.server's own limits over real sockets on 127.0.0.1: a client that leaves while
pipelined bytes wait unread, the total body deadline, the connection limit and running out of
file descriptors; and `lb serve` raising its open files limit.

The raw client and helpers are those of test_http_server.py.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing
from harness import start_lb, start_mock
from test_http_server import (
    Client,
    all_tasks,
    assert_no_exceptions,
    assert_openai_error,
    assert_serving,
    echo,
    get,
    post,
    rst_close,
    serving,
    waits_at_wait,
)

from lb.http.server import ACCEPT_BATCH, FD_RESERVE, MAX_PIPELINED_BYTES, HTTPServer
from lb.http.types import Request, Response


@pytest.fixture(autouse=True)
def _capture_lb_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lb")


def open_fds() -> int:
    """Descriptors open in this process, once garbage from earlier tests (sockets nothing
    refers to any more) has been collected, so that only this test's changes show."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd"
)


async def until_closed(server: HTTPServer, left: int = 0) -> None:
    """Wait until the server has closed all but `left` client connections."""
    while server.open_connections > left:
        await trio.sleep(0.01)


# --- a client that leaves while the reader is paused ---------------------------------------


@needs_proc
@pytest.mark.skipif(not hasattr(select, "epoll"), reason="the hang-up watch needs epoll")
@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_leaving_with_pipelined_bytes_unread_cancels_the_handler(
    caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """More than MAX_PIPELINED_BYTES wait behind a request whose handler runs: the reader has
    stopped reading, yet the client closing still cancels the handler at once."""
    started = trio.Event()
    cancelled = trio.Event()

    handler = waits_at_wait(started, cancelled)

    with trio.fail_after(5):
        async with serving(handler) as (server, port):
            before = open_fds()
            client = await Client.open(port)
            await client.send(get("/wait"))
            await started.wait()
            # A next request with a body larger than the read limit, pipelined.
            await client.send(post("/next", b"x" * (MAX_PIPELINED_BYTES + 100_000)))
            await trio.testing.wait_all_tasks_blocked(0.05)
            [conn] = server._connections
            assert len(conn.h11.trailing_data[0]) > MAX_PIPELINED_BYTES  # the reader paused
            assert not cancelled.is_set()
            if how == "fin":
                await client.aclose()
            else:
                rst_close(client)
            await cancelled.wait()
            await until_closed(server)
            assert open_fds() == before  # the connection and the reader's epoll are closed
            await assert_serving(port)
    assert_no_exceptions(caplog)


@needs_proc
@pytest.mark.parametrize("epoll", [True, False], ids=["epoll", "no-epoll"])
async def test_paused_reader_goes_on_and_leaves_no_descriptor_open(
    monkeypatch: pytest.MonkeyPatch, epoll: bool
) -> None:
    """Requests pipelined far beyond the read limit are all answered, with the hang-up watch
    or without it (where select.epoll is missing), and every watch is closed again."""
    if not epoll:
        monkeypatch.delattr(select, "epoll", raising=False)
    count = 300
    pad = "X-Pad: " + "p" * 3000
    raw = b"".join(get(f"/r{i}", pad) for i in range(count))
    assert len(raw) > 3 * MAX_PIPELINED_BYTES

    async def handler(request: Request) -> Response:
        if request.path in ("/r0", "/r150"):
            await trio.sleep(0.05)  # the reader pauses meanwhile
        return Response.json({"path": request.path})

    with trio.fail_after(10):
        async with serving(handler) as (server, port):
            before = open_fds()
            client = await Client.open(port)
            paths: list[str] = []

            async def read_all() -> None:
                for _ in range(count):
                    paths.append((await client.response()).json()["path"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                await client.send(raw)
            assert paths == [f"/r{i}" for i in range(count)]
            assert open_fds() == before + 2  # the client's socket and the server's: no epoll
            assert (await client.request(get("/last"))).json()["path"] == "/last"
            await client.aclose()
            await until_closed(server)
            assert open_fds() == before


# --- the body deadline -----------------------------------------------------------------------


async def test_body_dripped_past_body_timeout_gets_408(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """One byte every 9 s never trips the 10 s wait between reads, but the whole body must
    arrive within body_timeout (60 s) of the head: then 408 and the connection closes."""
    called = False

    async def handler(request: Request) -> Response:
        nonlocal called
        if request.path != "/alive":
            called = True
        return await echo(request)

    with trio.fail_after(1000):
        async with serving(handler, header_timeout=10, body_timeout=60) as (_, port):
            client = await Client.open(port)
            await client.send(b"POST /drip HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            start = trio.current_time()
            dripped = 0

            async def drip() -> None:
                nonlocal dripped
                for _ in range(100):
                    await trio.sleep(9)
                    try:
                        await client.send(b"a")
                    except trio.BrokenResourceError:
                        return
                    dripped += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drip)
                reply = await client.response(b"POST")
                elapsed = trio.current_time() - start
                nursery.cancel_scope.cancel()
            error = assert_openai_error(reply, 408)
            assert error["code"] == "request_timeout"
            assert "60 seconds" in error["message"]
            assert reply.header(b"connection") == b"close"
            assert 60 <= elapsed < 63  # virtual seconds: at the body deadline, not a read's
            assert dripped == 6
            await client.expect_eof()
            await client.aclose()
            assert not called
            await assert_serving(port)
    assert_no_exceptions(caplog)


async def test_body_within_body_timeout_is_served(autojump_clock: trio.testing.MockClock) -> None:
    """A body that keeps arriving and ends before the deadline is served normally."""
    with trio.fail_after(1000):
        async with serving(header_timeout=10, body_timeout=60) as (_, port):
            client = await Client.open(port)
            await client.send(b"POST /drip HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
            for _ in range(6):
                await trio.sleep(9)
                await client.send(b"a")
            reply = await client.response(b"POST")
            assert reply.status == 200
            assert reply.json()["body"] == "aaaaaa"
            await client.aclose()


# --- accepting -------------------------------------------------------------------------------


@pytest.mark.parametrize("waiting", [40, ACCEPT_BATCH + 10])
async def test_connections_waiting_to_be_accepted_are_taken_in_one_pass(waiting: int) -> None:
    """Connections queued in the kernel are accepted ACCEPT_BATCH at a time, not one per
    pass of trio's scheduler: a few passes take them all, and each is served."""
    with trio.fail_after(5):
        async with serving() as (server, port):
            await trio.testing.wait_all_tasks_blocked()  # the accept loop waits for one
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(waiting)]
            try:
                passes = 0
                while server.open_connections < waiting and passes < 10:
                    await trio.lowlevel.checkpoint()  # one pass of the scheduler
                    passes += 1
                assert server.open_connections == waiting
                assert passes <= 2 + waiting // ACCEPT_BATCH
                for sock in socks:
                    sock.sendall(get("/queued"))
                for sock in socks:
                    client = Client(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
                    assert (await client.response()).json()["path"] == "/queued"
            finally:
                for sock in socks:
                    sock.close()
            await assert_serving(port)


# --- the connection limit --------------------------------------------------------------------


async def test_connection_over_max_connections_gets_503_and_is_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(5):
        async with serving(max_connections=2) as (server, port):
            first = await Client.open(port)
            second = await Client.open(port)
            for client in (first, second):
                assert (await client.request(get("/"))).status == 200

            over = await Client.open(port)
            reply = await over.request(post("/v1/chat/completions", b"{}"), b"POST")
            error = assert_openai_error(reply, 503)
            assert error["code"] == "too_many_connections"
            assert error["type"] == "service_unavailable"
            assert "2" in error["message"]
            assert reply.header(b"connection") == b"close"
            assert reply.header(b"retry-after") == b"1"
            await over.expect_eof()
            await over.aclose()
            assert server.connection_limit == 2
            assert server.rejected_connections == 1
            assert server.open_connections == 2

            # The connections being served are not disturbed.
            assert (await first.request(get("/again"))).json()["path"] == "/again"
            # When one closes, a new connection is served again.
            await second.aclose()
            await until_closed(server, 1)
            await assert_serving(port)
            await first.aclose()
            assert server.rejected_connections == 1
    assert_no_exceptions(caplog)


async def test_rejected_connection_gets_one_task_and_no_parser() -> None:
    """A connection over the limit gets no h11 parser, reader or keep-alive loop: while it
    lingers (its client has not closed yet) it costs one task."""
    with trio.fail_after(5):
        async with serving(max_connections=1) as (server, port):
            served = await Client.open(port)
            assert (await served.request(get("/"))).status == 200
            await trio.testing.wait_all_tasks_blocked(0.01)
            tasks = len(all_tasks())
            over = await Client.open(port)
            assert (await over.response()).status == 503  # without sending a request
            await trio.testing.wait_all_tasks_blocked(0.01)
            assert len(all_tasks()) == tasks + 1
            assert len(server._connections) == 1
            assert server.rejected_connections == 1
            await over.aclose()
            await served.aclose()


@pytest.mark.parametrize("soft", [20000, 1024, 200])
async def test_max_connections_0_leaves_a_node_descriptor_each_and_a_reserve(soft: int) -> None:
    """The default limit is the most client connections such that each has a descriptor for
    its node's connection too, with FD_RESERVE (a quarter of a small limit) left for lb's own."""
    reserve = min(FD_RESERVE, soft // 4)
    with open_files_limit(min(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1])):
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        with trio.fail_after(5):
            async with serving() as (server, port):
                limit = server.connection_limit
                assert 2 * limit + reserve <= soft < 2 * (limit + 1) + reserve
                await assert_serving(port)
                assert server.rejected_connections == 0


@contextmanager
def open_files_limit(soft: int) -> Iterator[None]:
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


async def test_accept_loop_survives_running_out_of_file_descriptors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The process may open one more descriptor: the client's socket. The server's accept
    then fails with EMFILE; once descriptors are available again the waiting connection is
    served, and so are new ones."""
    with trio.fail_after(5):
        async with serving() as (_, port):
            free = os.dup(0)
            next_free = os.dup(0)
            os.close(free)
            os.close(next_free)
            with open_files_limit(max(free, next_free)):
                client = await Client.open(port)
                await client.send(get("/first"))
                while not any("accept failed" in r.getMessage() for r in caplog.records):
                    await trio.sleep(0.01)
            reply = await client.response()
            assert reply.json()["path"] == "/first"
            await client.aclose()
            await assert_serving(port)
    failures = [r for r in caplog.records if "accept failed" in r.getMessage()]
    assert "Too many open files" in failures[0].getMessage()


# --- lb serve -------------------------------------------------------------------------------


async def assert_serving_lb(port: int) -> None:
    client = await Client.open(port)
    try:
        reply = await client.request(get("/health/liveness"))
        assert reply.status == 200
    finally:
        await client.aclose()


async def test_serve_raises_the_soft_open_files_limit_to_the_hard_one(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no finite hard limit to raise the soft one to")
    lower = min(soft, hard - 1, 1024)
    with open_files_limit(lower), trio.fail_after(10):
        node = await start_mock(nursery, models=("m",))
        lb = await start_lb(nursery, [node], max_connections=0)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert any(
            r.levelno == logging.DEBUG and "open files limit raised" in r.getMessage()
            for r in caplog.records
        )
        await assert_serving_lb(lb.port)
        lb.stop()
        node.stop()


# --- the send timeout ------------------------------------------------------------------------


async def test_a_slow_reader_of_a_large_answer_is_not_a_stalled_one() -> None:
    """LB_SEND_TIMEOUT_SECS bounds each wait for the client to make room, not the whole
    transfer: a client that keeps reading, slowly, gets all of a large answer."""
    body = os.urandom(1 << 20)

    async def handler(request: Request) -> Response:
        if request.path != "/big":
            return await echo(request)
        return Response(200, [(b"content-type", b"application/octet-stream")], body)

    with trio.fail_after(20):
        async with serving(handler, send_timeout=0.3) as (_, port):
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
            await stream.send_all(b"GET /big HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            received = bytearray()
            started = trio.current_time()
            while data := await stream.receive_some(16384):
                received += data
                await trio.sleep(0.01)  # a slow reader: the transfer outlasts send_timeout
            assert trio.current_time() - started > 0.3
            assert received.endswith(body)
            await stream.aclose()
            await assert_serving(port)
