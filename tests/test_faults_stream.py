"""Stream faults end to end over real sockets: clients that stop reading or leave, nodes that
break a stream, answer with something that is no answer, or drop the connection after `[DONE]`.
Each test shows what the client got (status, exact bytes or events), what the node saw, and
that lb keeps serving. (The same rules on a fake upstream: test_dispatch.py; a stream cut by
the end of the drain: test_cli.py.)
"""

from __future__ import annotations

import array
import fcntl
import select
import socket
import struct
import termios
from typing import Any

import h11
import httpx
import orjson
import pytest
import trio
from harness import (
    CHAT,
    Running,
    RunningMock,
    Script,
    json_answer,
    read_body,
    start_lb,
    start_mock,
    start_scripted,
)

MODEL = "llama-3.1-8b"
CHAT_PATH = "/v1/chat/completions"
# Far more than the kernel buffers between lb and a client that reads nothing can hold
# (about 18 MB of events), written by the mock node as fast as lb takes them.
LONG_FAST_STREAM = "tokens=100000,itl-ms=0"

SSE_CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
EVENT_1 = b'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
EVENT_2 = b'data: {"choices":[{"index":0,"delta":{"content":" world"}}]}\n\n'
DONE = b"data: [DONE]\n\n"
PARTIAL = b'data: {"partial'
NODE_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-1", "object": "chat.completion", "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                 "finish_reason": "stop"}],
}


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


async def drop(stream: trio.SocketStream, how: str) -> None:
    """Close a node's connection abruptly: a FIN without the last chunk, or a reset."""
    if how == "reset":
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


async def answer_normally(head: bytes, stream: trio.SocketStream, buffered: bytearray) -> None:
    await read_body(stream, head, buffered)
    await stream.send_all(json_answer(NODE_ANSWER))


def in_turn(*scripts: Script) -> tuple[Script, list[bytes]]:
    """A script playing `scripts` one chat request after another (the last one repeats), and
    the heads of the requests the node received, in order."""
    seen: list[bytes] = []

    async def play(head: bytes, stream: trio.SocketStream, buffered: bytearray) -> None:
        seen.append(head)
        await scripts[min(len(seen), len(scripts)) - 1](head, stream, buffered)

    return play, seen


async def node_view(lb: Running, key: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        nodes = (await client.get(f"{lb.url}/v1/nodes")).json()["nodes"]
    found: dict[str, Any] = next(node for node in nodes if node["node"] == key)
    return found


async def chat(lb: Running, *, stream: bool = False) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            f"{lb.url}{CHAT_PATH}", json={"model": MODEL, "stream": stream, **CHAT}
        )


def request_bytes(body: dict[str, Any], extra_headers: bytes = b"") -> bytes:
    data = orjson.dumps(body)
    return (
        b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nhost: lb\r\n"
        b"content-type: application/json\r\n" + extra_headers
        + b"content-length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )


class Client:
    """A raw-socket client that parses lb's answer with h11, so a malformed answer (a torn
    chunk, a body cut before its last chunk) raises instead of passing."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = h11.Connection(h11.CLIENT)
        self.response: h11.Response | None = None
        self.body = bytearray()
        self.ended = False

    @classmethod
    async def post(cls, lb: Running, *, stream: bool) -> Client:
        client = cls(await trio.open_tcp_stream("127.0.0.1", lb.port))
        data = orjson.dumps({"model": MODEL, "stream": stream, **CHAT})
        parser = client.parser
        out = parser.send(h11.Request(
            method="POST", target=CHAT_PATH,
            headers=[("host", "lb"), ("content-type", "application/json"),
                     ("content-length", str(len(data)))],
        ))
        out += parser.send(h11.Data(data=data)) + parser.send(h11.EndOfMessage())
        await client.stream.send_all(out)
        return client

    async def _step(self) -> None:
        assert not self.ended, "the answer already ended"
        parser = self.parser
        event = parser.next_event()
        while event is h11.NEED_DATA:
            parser.receive_data(await self.stream.receive_some(65536))
            event = parser.next_event()
        if isinstance(event, h11.Response):
            self.response = event
        elif isinstance(event, h11.Data):
            self.body += event.data
        elif isinstance(event, h11.EndOfMessage):
            self.ended = True
        else:
            raise AssertionError(f"unexpected {event!r}")

    async def until(self, marker: bytes) -> bytes:
        """The body received by the time `marker` is in it."""
        while marker not in self.body:
            assert not self.ended, f"the answer ended without {marker!r}: {bytes(self.body)!r}"
            await self._step()
        return bytes(self.body)

    async def whole(self) -> bytes:
        """The whole body, up to the end of the message."""
        while not self.ended:
            await self._step()
        await self.stream.aclose()
        return bytes(self.body)

    def header(self, name: bytes) -> bytes | None:
        assert self.response is not None
        return next((v for k, v in self.response.headers if k == name), None)


def error_code(event: bytes) -> str:
    """The code of an error event, `data: {"error": {...}}`."""
    assert event.startswith(b"data: "), event
    code: str = orjson.loads(event[len(b"data: "):])["error"]["code"]
    return code


# -- 1, 2: a client that stops reading ------------------------------------------------------

# Either limit may be the one that notices the stalled client: a write blocked past
# send_timeout, or the node's stream waiting on that write past stream_idle_timeout.
STALLS = pytest.mark.parametrize(
    "limits",
    [
        pytest.param({"send_timeout": 0.5, "stream_idle_timeout": 30.0}, id="send_timeout"),
        pytest.param({"send_timeout": 30.0, "stream_idle_timeout": 0.3}, id="idle_timeout"),
    ],
)


async def stalled_stream(lb: Running, node: RunningMock) -> tuple[bytes, bool]:
    """Ask lb for a long fast stream on a socket with a small receive buffer and read nothing
    until the node's connection to lb was closed; then read what lb had sent, to the end: the
    bytes, and whether the end came (EOF or reset) rather than lb keeping the connection."""
    disconnects = (await node.stats())["disconnects"]
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", lb.port))
    stream = trio.SocketStream(sock)
    await stream.send_all(request_bytes(
        {"model": MODEL, "stream": True, **CHAT},
        b"x-mock-fault: " + LONG_FAST_STREAM.encode() + b"\r\n",
    ))
    while (await node.stats())["disconnects"] == disconnects:
        await trio.sleep(0.02)
    received = bytearray()
    with trio.move_on_after(10) as reading:
        try:
            while data := await stream.receive_some(65536):
                received += data
        except trio.BrokenResourceError:  # a reset: closed too
            pass
    await stream.aclose()
    return bytes(received), not reading.cancelled_caught


@STALLS
async def test_a_client_that_stops_reading_is_not_a_node_failure(
    nursery: trio.Nursery, limits: dict[str, float]
) -> None:
    with trio.fail_after(30):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], breaker_threshold=1, **limits)
        for _ in range(3):
            received, closed = await stalled_stream(lb, node)
            assert closed, received[-300:]
            assert received.startswith(b"HTTP/1.1 200 "), received[:200]
            assert not received.endswith(b"0\r\n\r\n")  # cut: the stream never ended
        # The node saw each of its connections closed, and was answered nothing it finished.
        stats = await node.stats()
        assert stats["by_path"][CHAT_PATH] == 3
        assert stats["disconnects"] == 3
        view = await node_view(lb, node.key)
        assert view["failures"] == 0 and view["consecutive_failures"] == 0
        assert view["breaker"] == "closed" and view["last_error"] == ""
        assert view["inflight"] == 0  # its slot was freed
        streamed = await chat(lb, stream=True)
        assert streamed.status_code == 200 and streamed.content.endswith(DONE)
        assert streamed.headers["x-routed-node"] == node.key
        assert (await chat(lb)).json()["choices"][0]["message"]["content"]


def is_mock_chunk(event: bytes) -> bool:
    """Whether `event` (without its blank line) is one of the mock node's stream chunks."""
    if not event.startswith(b"data: "):
        return False
    try:
        payload = orjson.loads(event[len(b"data: "):])
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, dict) and payload.get("object") == "chat.completion.chunk"


@STALLS
async def test_after_a_write_was_cut_off_nothing_more_is_written(
    nursery: trio.Nursery, limits: dict[str, float]
) -> None:
    with trio.fail_after(30):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], **limits)
        received, closed = await stalled_stream(lb, node)
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(
            method="POST", target=CHAT_PATH, headers=[("host", "lb"), ("content-length", "0")]
        ))
        parser.send(h11.EndOfMessage())
        parser.receive_data(received)
        events: list[Any] = []
        while (event := parser.next_event()) is not h11.NEED_DATA:  # no protocol error
            events.append(event)
        response, *data = events
        assert isinstance(response, h11.Response) and response.status_code == 200
        assert (b"transfer-encoding", b"chunked") in response.headers
        assert all(isinstance(item, h11.Data) for item in data)  # and no end of message
        parser.receive_data(b"")
        with pytest.raises(h11.RemoteProtocolError):  # the body is simply incomplete
            parser.next_event()
        # What came is the node's events, untouched: nothing glued after a torn chunk (an
        # error event, a chunk header) would survive this.
        body = b"".join(item.data for item in data)
        *whole, tail = body.split(b"\n\n")
        assert len(whole) > 10
        for event_bytes in whole:
            assert is_mock_chunk(event_bytes), event_bytes[-300:]
        start = b'data: {"id":'
        assert tail.startswith(start) or start.startswith(tail), tail[:200]
        assert b"\r" not in tail and b"error" not in tail and b"data:" not in tail[1:]
        assert closed
        assert (await chat(lb)).status_code == 200


async def test_a_non_stream_answer_frees_the_node_before_a_slow_client_reads_it(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(30):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], send_timeout=30.0, breaker_threshold=1)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", lb.port))
        client = trio.SocketStream(sock)
        # An answer of about 700 KB, far more than the buffers between lb and the client.
        await client.send_all(request_bytes(
            {"model": MODEL, **CHAT}, b"x-mock-fault: tokens=100000\r\nconnection: close\r\n"
        ))
        while not (await node.stats())["by_path"].get(CHAT_PATH):
            await trio.sleep(0.02)
        # The client reads nothing, yet the node's slot is free: lb holds the whole answer.
        while (await node_view(lb, node.key))["inflight"]:
            await trio.sleep(0.02)
        assert (await node.stats())["concurrent"] == 0
        received = bytearray()
        while data := await client.receive_some(65536):  # now read it all
            received += data
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        content = orjson.loads(body)["choices"][0]["message"]["content"]
        assert len(content.split()) == 100000
        view = await node_view(lb, node.key)
        assert view["failures"] == 0 and view["breaker"] == "closed"
        assert (await chat(lb)).status_code == 200


# -- 3: SSE event boundaries ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_stream_cut_inside_an_event_ends_with_one_error_event_not_half_an_event(
    nursery: trio.Nursery, how: str
) -> None:
    client_saw_first = trio.Event()

    async def half_an_event_then_gone(
        head: bytes, stream: trio.SocketStream, buffered: bytearray
    ) -> None:
        await read_body(stream, head, buffered)
        await stream.send_all(SSE_CHUNKED + chunk(EVENT_1))
        await client_saw_first.wait()
        await stream.send_all(chunk(PARTIAL))
        # Give the partial event time to reach lb before the connection ends (a reset may
        # discard it on the way; it must not reach the client either way).
        await trio.sleep(0.05)
        await drop(stream, how)

    with trio.fail_after(10):
        script, seen = in_turn(half_an_event_then_gone, answer_normally)
        node = await start_scripted(nursery, script)
        lb = await start_lb(nursery, [node])
        client = await Client.post(lb, stream=True)
        assert await client.until(b"\n\n") == EVENT_1
        client_saw_first.set()
        body = await client.whole()  # ends with its last chunk: h11 would raise otherwise
        assert client.response is not None and client.response.status_code == 200
        assert body.startswith(EVENT_1)
        error, done, nothing = body[len(EVENT_1):].split(b"\n\n")
        assert error_code(error) == "upstream_stream_error"
        assert done == b"data: [DONE]" and nothing == b""
        assert b"partial" not in body and b"ddata" not in body
        assert len(seen) == 1
        view = await node_view(lb, node.key)
        assert view["failures"] == 1  # a stream the node broke is its failure
        assert (await chat(lb)).json() == NODE_ANSWER


CRLF_EVENTS = [
    b'data: {"choices":[{"index":0,"delta":{"content":"one"}}]}\r\n\r\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"two"}}]}\r\n\r\n',
    b"data: [DONE]\r\n\r\n",
]


@pytest.mark.parametrize(
    "first_writes",
    [
        pytest.param([CRLF_EVENTS[0]], id="whole"),
        # The blank line's CRLF comes 0.2 s after the rest of the event.
        pytest.param([CRLF_EVENTS[0][:-2], CRLF_EVENTS[0][-2:]], id="split_boundary"),
    ],
)
async def test_crlf_events_are_forwarded_one_by_one_not_held_to_the_end(
    nursery: trio.Nursery, first_writes: list[bytes]
) -> None:
    client_saw_first = trio.Event()

    async def crlf_stream(head: bytes, stream: trio.SocketStream, buffered: bytearray) -> None:
        await read_body(stream, head, buffered)
        await stream.send_all(SSE_CHUNKED)
        for i, piece in enumerate(first_writes):
            if i:
                await trio.sleep(0.2)
            await stream.send_all(chunk(piece))
        # The next event only once the client has the first one: a proxy that held CRLF
        # events until the end would never get it, and the test's deadline would fail it.
        await client_saw_first.wait()
        await trio.sleep(0.2)
        await stream.send_all(b"".join(chunk(e) for e in CRLF_EVENTS[1:]) + b"0\r\n\r\n")

    with trio.fail_after(10):
        script, seen = in_turn(crlf_stream, answer_normally)
        node = await start_scripted(nursery, script)
        lb = await start_lb(nursery, [node])
        client = await Client.post(lb, stream=True)
        first = await client.until(b"\r\n\r\n")
        assert first == CRLF_EVENTS[0]  # before the node sent anything more
        client_saw_first.set()
        assert await client.whole() == b"".join(CRLF_EVENTS)  # untouched, no error event
        assert len(seen) == 1
        assert (await node_view(lb, node.key))["failures"] == 0
        assert (await chat(lb)).json() == NODE_ANSWER


# -- 4: broken answers are the node's failures ------------------------------------------------


async def redirect(head: bytes, stream: trio.SocketStream, buffered: bytearray) -> None:
    await read_body(stream, head, buffered)
    await stream.send_all(
        b"HTTP/1.1 302 Found\r\nlocation: http://login.example/\r\ncontent-length: 0\r\n\r\n"
    )


HTML = b"<html><body><h1>Welcome to nginx!</h1></body></html>"


async def html_page(head: bytes, stream: trio.SocketStream, buffered: bytearray) -> None:
    await read_body(stream, head, buffered)
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: "
        + str(len(HTML)).encode() + b"\r\n\r\n" + HTML
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("script", "named"),
    [pytest.param(redirect, "HTTP 302", id="redirect"),
     pytest.param(html_page, "HTTP 200 with a body that is not JSON", id="html")],
)
async def test_a_broken_answer_fails_over_and_counts_against_the_node(
    nursery: trio.Nursery, script: Script, named: str, stream: bool
) -> None:
    with trio.fail_after(10):
        play, seen = in_turn(script)
        bad = await start_scripted(nursery, play)
        good = await start_mock(nursery, models=(MODEL,), tokens=3)
        # Round robin over [bad, good]: the first request tries the bad node first.
        lb = await start_lb(nursery, [bad, good], routing_strategy="round_robin")
        answer = await chat(lb, stream=stream)
        assert answer.status_code == 200
        assert answer.headers["x-routed-node"] == good.key
        assert answer.headers["x-attempts"] == "2"
        if stream:
            assert answer.content.endswith(DONE) and b'"error"' not in answer.content
        else:
            assert answer.json()["model"] == MODEL and answer.json()["choices"]
        assert len(seen) == 1 and await good.chats() == 1
        view = await node_view(lb, bad.key)
        assert view["failures"] == 1 and view["last_error"] == named
        assert (await node_view(lb, good.key))["failures"] == 0
        assert (await chat(lb)).status_code == 200


@pytest.mark.parametrize(
    "last", [pytest.param(b"", id="between_events"), pytest.param(PARTIAL, id="inside_an_event")]
)
async def test_a_close_delimited_stream_without_done_ends_with_an_error_event(
    nursery: trio.Nursery, last: bytes
) -> None:
    async def close_delimited(head: bytes, stream: trio.SocketStream, buffered: bytearray) -> None:
        await read_body(stream, head, buffered)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
            + EVENT_1 + EVENT_2 + last
        )
        # ... and the connection ends (the handler closes it): no [DONE].

    with trio.fail_after(10):
        play, seen = in_turn(close_delimited)
        bad = await start_scripted(nursery, play)
        good = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [bad, good], routing_strategy="round_robin")
        client = await Client.post(lb, stream=True)
        body = await client.whole()
        assert client.response is not None and client.response.status_code == 200
        assert client.header(b"x-routed-node") == bad.key.encode()
        # The whole events, then the error event and [DONE]; an unfinished event is not an
        # event (an SSE client drops it at the end of the stream): it is not passed on.
        assert body.startswith(EVENT_1 + EVENT_2), body
        error, done, nothing = body[len(EVENT_1 + EVENT_2):].split(b"\n\n")
        assert error_code(error) == "upstream_stream_error"
        assert done == b"data: [DONE]" and nothing == b""
        assert b"partial" not in body
        assert len(seen) == 1
        view = await node_view(lb, bad.key)
        assert view["failures"] == 1 and view["last_error"] == "closed the stream before [DONE]"
        answer = await chat(lb)  # round robin: the good node's turn first
        assert answer.status_code == 200 and answer.headers["x-routed-node"] == good.key


# -- 5: [DONE] and then a dropped connection -------------------------------------------------


@pytest.mark.parametrize("how", ["fin", "reset"])
@pytest.mark.parametrize("ending", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
async def test_done_then_a_dropped_connection_is_a_success(
    nursery: trio.Nursery, ending: bytes, how: str
) -> None:
    events = [e.replace(b"\n\n", ending) for e in (EVENT_1, EVENT_2, DONE)]
    client_saw_done = trio.Event()

    async def done_then_gone(head: bytes, stream: trio.SocketStream, buffered: bytearray) -> None:
        await read_body(stream, head, buffered)
        await stream.send_all(SSE_CHUNKED + b"".join(chunk(e) for e in events))
        if how == "reset":  # a reset may discard what lb has not read yet: after [DONE] only
            await client_saw_done.wait()
        await drop(stream, how)  # no last chunk

    with trio.fail_after(10):
        script, seen = in_turn(done_then_gone, answer_normally)
        node = await start_scripted(nursery, script)
        lb = await start_lb(nursery, [node], breaker_threshold=1)
        client = await Client.post(lb, stream=True)
        await client.until(events[-1])
        client_saw_done.set()
        body = await client.whole()  # lb ends the message properly
        assert client.response is not None and client.response.status_code == 200
        assert body == b"".join(events)  # no error event
        assert len(seen) == 1
        view = await node_view(lb, node.key)
        assert view["failures"] == 0 and view["breaker"] == "closed"
        assert view["last_error"] == ""
        assert (await chat(lb)).json() == NODE_ANSWER


# -- 6: a client that leaves, with pipelined bytes waiting -----------------------------------


def unacknowledged(stream: trio.SocketStream) -> int:
    """Bytes written to `stream` that its peer's host has not acknowledged (Linux)."""
    count = array.array("i", [0])
    fcntl.ioctl(stream.socket.fileno(), termios.TIOCOUTQ, count)
    return count[0]


@pytest.mark.skipif(
    not hasattr(select, "epoll"), reason="elsewhere lb sees it once the pipelined bytes are read"
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_client_that_leaves_is_seen_at_once_even_with_pipelined_data_waiting(
    nursery: trio.Nursery, stream: bool
) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        slow = request_bytes(
            {"model": MODEL, "stream": stream, **CHAT}, b"x-mock-fault: ttft-ms=5000\r\n"
        )
        # A second request whose body is over what lb reads ahead (MAX_PIPELINED_BYTES, 256
        # KiB), so lb stops reading; small enough that the rest fits in its socket's buffer.
        big = request_bytes({"model": MODEL, **CHAT, "padding": "x" * (300 * 1024)})
        client = await trio.open_tcp_stream("127.0.0.1", lb.port)
        await client.send_all(slow + big)
        while not (await node.stats())["by_path"].get(CHAT_PATH):  # the node is generating
            await trio.sleep(0.01)
        # Close only once every byte has reached lb's host: a FIN queued behind bytes that
        # lb's host cannot take yet would not even leave this one.
        while unacknowledged(client) > 0:
            await trio.sleep(0.01)
        await client.aclose()
        with trio.fail_after(2):  # well before the node's 5 s answer
            while (await node.stats())["disconnects"] == 0:
                await trio.sleep(0.02)
        stats = await node.stats()
        assert stats["by_path"][CHAT_PATH] == 1  # the pipelined one was never forwarded
        assert stats["concurrent"] == 0
        view = await node_view(lb, node.key)
        assert view["failures"] == 0 and view["inflight"] == 0
        assert (await chat(lb)).status_code == 200
