"""lb.http.server's own limits over real sockets on 127.0.0.1: a client that leaves while
pipelined bytes wait unread, and the total body deadline.

The raw client and helpers are those of test_http_server.py.
"""

from __future__ import annotations

import logging
import os
import select

import pytest
import trio
import trio.testing
from test_http_server import (
    Client,
    assert_no_exceptions,
    assert_openai_error,
    assert_serving,
    echo,
    get,
    post,
    rst_close,
    serving,
)

from lb.http.server import MAX_PIPELINED_BYTES, HTTPServer
from lb.http.types import Request, Response


@pytest.fixture(autouse=True)
def _capture_lb_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lb")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd"
)


async def until_closed(server: HTTPServer, left: int = 0) -> None:
    """Wait until the server has closed all but `left` client connections."""
    while len(server._connections) > left:
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

    async def handler(request: Request) -> Response:
        if request.path != "/wait":
            return await echo(request)
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

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
