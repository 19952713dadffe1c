"""lb bench's own parsing and wire: SSE events and HTTP/1.1 responses cut anywhere
(hypothesis), then its client against raw servers on real sockets (keep-alive, a stale
connection retried, an early answer, errors by kind)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import ssl
from collections.abc import Awaitable, Callable

import orjson
import pytest
import trio
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.bench.sse import EventCounter
from lb.bench.wire import Response, Target, WireError
from lb.bench.workloads import Request

# --- SSE events split across reads --------------------------------------------------------

_ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r"])
# Never empty and never starting with "{", "[" or a space (those the counter looks at).
_TEXT = st.binary(max_size=20).map(lambda b: b"t" + b.replace(b"\r", b"").replace(b"\n", b""))
# An event's data: what the counter must recognise ([DONE], usage, an error) or anything.
_DATA = st.one_of(
    st.just(b"[DONE]"),
    st.builds(lambda n: orjson.dumps({"usage": {"completion_tokens": n}}), st.integers(0, 99)),
    st.just(b'{"error":{"message":"boom"}}'),
    # events that mention usage without being the usage event
    st.just(b'{"error":{"message":"boom"},"usage":null}'),
    st.just(b't "usage": not JSON'),
    st.builds(lambda t: orjson.dumps({"choices": [{"delta": {"content": t.hex()}}]}), _TEXT),
    # Anthropic's Messages stream: its end, its error, and a text that only names them.
    st.just(b'{"type":"message_stop"}'),
    st.just(b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'),
    st.just(b'{"type":"content_block_delta","delta":{"text":"message_stop \\"error\\""}}'),
    _TEXT,
)


def _anthropic_type(data: bytes) -> object:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return event.get("type") if isinstance(event, dict) else None
# Lines other than data: comments, other fields; an event made of them only is no event.
_OTHER = st.one_of(st.builds(lambda t: b":" + t, _TEXT), st.builds(lambda t: b"event: " + t,
                                                                      _TEXT),
                   st.just(b"id: 7"), st.just(b"retry: 10"))


@st.composite
def sse_stream(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A stream, and for each event (with data) the offset at which the stream holds its end
    (the first byte of the blank line's line ending) and its data."""
    out = b""
    events: list[tuple[int, bytes]] = []
    for _ in range(draw(st.integers(0, 8))):
        lines: list[bytes] = []
        values: list[bytes] = []
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):
                value = draw(_DATA)
                values.append(value)
                lines.append(b"data: " + value if draw(st.booleans()) else b"data:" + value)
            else:
                lines.append(draw(_OTHER))
        for line in lines:
            out += line + draw(_ENDINGS)
        # No CR right before an LF-first blank line: that pair would be one line ending.
        blank = draw(_ENDINGS)
        if out.endswith(b"\r") and blank[:1] == b"\n":
            blank = b"\r"
        if values:
            events.append((len(out) + 1, b"\n".join(values)))
        out += blank
    return out, events


@st.composite
def plain_stream(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes]]]:
    """As OpenAI-style servers send: every event one `data: ` line, LF line endings (the
    counter's fast path)."""
    out = b""
    events: list[tuple[int, bytes]] = []
    for value in draw(st.lists(_DATA, max_size=12)):
        out += b"data: " + value + b"\n"
        events.append((len(out) + 1, value))
        out += b"\n"
    return out, events


def _cuts(data: st.DataObject, size: int) -> list[int]:
    """Where the reads end: anywhere, any number of times."""
    points = data.draw(st.lists(st.integers(0, size), max_size=8))
    return sorted({0, size, *points})


@settings(max_examples=500)
@given(st.one_of(sse_stream(), plain_stream()), st.data())
def test_sse_events_are_counted_as_they_end_however_the_reads_cut_them(
    stream: tuple[bytes, list[tuple[int, bytes]]], data: st.DataObject,
) -> None:
    raw, events = stream
    cuts = _cuts(data, len(raw))
    counter = EventCounter()
    for start, end in itertools.pairwise(cuts):
        ended = counter.feed(raw[start:end])
        assert ended == sum(1 for at, _ in events if start < at <= end)
    assert counter.events == len(events)
    datas = [d for _, d in events]
    assert counter.done == (b"[DONE]" in datas or any(
        _anthropic_type(d) == "message_stop" for d in datas))
    # An error event: JSON data that starts {"error" (OpenAI) or of type "error" (Anthropic);
    # else JSON data mentioning usage.
    errors = [d for d in datas if d.startswith(b'{"error"') or _anthropic_type(d) == "error"]
    assert counter.error == bool(errors)
    usage = [d for d in datas if d[:1] == b"{" and d not in errors and b'"usage"' in d]
    assert counter.usage == (usage[-1] if usage else b"")


def test_an_unfinished_event_at_the_end_is_no_event() -> None:
    counter = EventCounter()
    assert counter.feed(b"data: 1\n\ndata: [DONE]\n") == 1
    assert (counter.events, counter.done) == (1, False)


# --- HTTP/1.1 responses cut anywhere --------------------------------------------------------


@st.composite
def chunked_response(draw: st.DrawFn) -> tuple[bytes, bytes]:
    body = draw(st.binary(max_size=300))
    sizes = draw(st.lists(st.integers(1, 64), max_size=20))
    out = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    at = 0
    for size in sizes:
        piece = body[at:at + size]
        if not piece:
            break
        ext = b";ext=1" if draw(st.booleans()) else b""
        out += b"%x%s\r\n%s\r\n" % (len(piece), ext, piece)
        at += len(piece)
    if at < len(body):
        out += b"%x\r\n%s\r\n" % (len(body) - at, body[at:])
    out += b"0\r\nx-trailer: 1\r\n\r\n" if draw(st.booleans()) else b"0\r\n\r\n"
    return out, body


@settings(max_examples=300)
@given(chunked_response(), st.data())
def test_a_chunked_body_split_anywhere_comes_out_whole_and_ends_once(
    response: tuple[bytes, bytes], data: st.DataObject,
) -> None:
    raw, body = response
    cuts = _cuts(data, len(raw))
    parsed = Response()
    got = b""
    for start, end in itertools.pairwise(cuts):
        assert not parsed.complete
        parsed.feed(raw[start:end])
        got += b"".join(parsed.take())
    assert parsed.complete and parsed.status == 200
    assert got == body
    assert parsed.reusable()


@settings(max_examples=200)
@given(st.binary(max_size=300), st.data())
def test_a_content_length_body_split_anywhere(body: bytes, data: st.DataObject) -> None:
    raw = b"HTTP/1.1 503 Busy\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    cuts = _cuts(data, len(raw))
    parsed = Response()
    got = b""
    for start, end in itertools.pairwise(cuts):
        parsed.feed(raw[start:end])
        got += b"".join(parsed.take())
    assert (parsed.complete, parsed.status, got) == (True, 503, body)


def test_a_body_delimited_by_the_close_ends_at_eof_and_is_not_reused() -> None:
    parsed = Response()
    parsed.feed(b"HTTP/1.1 200 OK\r\n\r\nsome")
    parsed.feed(b" body")
    assert not parsed.complete
    parsed.feed(b"")
    assert parsed.complete and b"".join(parsed.take()) == b"some body"
    assert not parsed.reusable()


def test_eof_inside_a_body_is_closed_and_garbage_is_protocol() -> None:
    parsed = Response()
    parsed.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
    with pytest.raises(WireError) as closed:
        parsed.feed(b"")
    assert closed.value.kind == "closed"
    with pytest.raises(WireError) as bad:
        Response().feed(b"SMTP ready\r\n\r\n")
    assert bad.value.kind == "protocol"


def test_100_continue_is_skipped_and_connection_close_is_not_reused() -> None:
    parsed = Response()
    parsed.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nconnection: close\r\n"
                b"content-length: 2\r\n\r\nok")
    assert (parsed.complete, parsed.status, parsed.take()) == (True, 201, [b"ok"])
    assert not parsed.reusable()


def test_bytes_after_a_response_make_the_connection_unusable() -> None:
    parsed = Response()
    parsed.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert parsed.complete and parsed.take() == [b"ok"]
    assert not parsed.reusable()


# --- the request bytes ----------------------------------------------------------------------


def test_the_request_is_built_once_with_the_prefix_and_without_hop_by_hop_headers() -> None:
    target = Target("http://example.test:8080/gw/", [(b"content-type", b"application/json"),
                                                     (b"connection", b"close"),
                                                     (b"x-k", b"v")])
    request = Request("/v1/chat/completions", b'{"a":1}', False)
    payload = target.payload(request)
    assert payload == (b"POST /gw/v1/chat/completions HTTP/1.1\r\nhost: example.test:8080\r\n"
                       b"content-type: application/json\r\nx-k: v\r\ncontent-length: 7\r\n\r\n"
                       b'{"a":1}')
    assert target.payload(request) is payload


@pytest.mark.parametrize("headers, url", [
    ([(b"x-bad\n", b"1")], "http://h"),
    ([(b"x", b"a\r\nInjected: 1")], "http://h"),
    ([], "ftp://h"),
])
def test_a_bad_header_or_url_is_a_value_error(headers: list[tuple[bytes, bytes]],
                                              url: str) -> None:
    with pytest.raises(ValueError):
        Target(url, headers)


def test_a_path_that_cannot_go_on_the_wire_is_a_client_error() -> None:
    with pytest.raises(WireError) as bad:
        Target("http://h").payload(Request("/v1/a b", b"", False))
    assert bad.value.kind == "client"


# --- on real sockets -------------------------------------------------------------------------

Handler = Callable[[trio.SocketStream], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def _serve(nursery: trio.Nursery, handler: Handler) -> str:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                      host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def _read_request(stream: trio.abc.Stream, buffer: bytearray) -> bool:
    """Read up to the end of one request head plus its body (content-length); False at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return False
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += await stream.receive_some(65536)
    buffer[:] = rest[length:]
    return True


async def _exchange(target: Target, body: bytes = b"{}") -> tuple[int, bytes]:
    conn = await target.send(target.payload(Request("/v1/x", body, False)))
    parts = conn.response.take()
    while not conn.response.complete:
        await conn.read()
        parts += conn.response.take()
    status = conn.response.status
    target.release(conn, trio.current_time())
    return status, b"".join(parts)


async def test_keep_alive_reuses_one_connection(nursery: trio.Nursery) -> None:
    accepted = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        buffer = bytearray()
        while await _read_request(stream, buffer):
            await stream.send_all(OK)

    target = Target(await _serve(nursery, handler))
    for _ in range(5):
        assert await _exchange(target) == (200, b"ok")
    assert accepted == 1
    await target.aclose()


async def test_a_connection_the_server_closed_while_idle_is_retried_once_on_a_new_one(
    nursery: trio.Nursery,
) -> None:
    # The server answers one request per connection, keep-alive notwithstanding, and closes
    # as soon as the next request arrives: the client's reused connection dies before any
    # byte of the answer, so the request goes again on a new connection.
    accepted = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        buffer = bytearray()
        await _read_request(stream, buffer)
        await stream.send_all(OK)
        await _read_request(stream, buffer)

    target = Target(await _serve(nursery, handler))
    for _ in range(3):
        assert await _exchange(target) == (200, b"ok")
    assert accepted == 3
    await target.aclose()


async def test_an_answer_sent_before_the_body_was_read_is_the_result(
    nursery: trio.Nursery,
) -> None:
    # A 413 sent after the head only, then a close with the body unread (a RST): the send
    # fails, and the answer that had arrived is what the bench reports.
    async def handler(stream: trio.SocketStream) -> None:
        while b"\r\n\r\n" not in await stream.receive_some(65536):
            pass
        await stream.send_all(b"HTTP/1.1 413 Too Large\r\nconnection: close\r\n"
                              b"content-length: 3\r\n\r\nbig")
        await stream.aclose()

    target = Target(await _serve(nursery, handler))
    with trio.fail_after(10):
        assert await _exchange(target, b"x" * (8 << 20)) == (413, b"big")
    await target.aclose()


async def test_errors_have_the_benchs_kinds(nursery: trio.Nursery) -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        await _read_request(stream, bytearray())
        await stream.send_all(b"hello?\r\n\r\n")

    async def hang_up(stream: trio.SocketStream) -> None:
        await _read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart")

    for handler, kind in ((garbage, "protocol"), (hang_up, "closed")):
        target = Target(await _serve(nursery, handler))
        with pytest.raises(WireError) as failed:
            await _exchange(target)
        assert failed.value.kind == kind
    with pytest.raises(WireError) as refused:
        await _exchange(Target("http://127.0.0.1:1"))
    assert refused.value.kind == "connect"


async def test_https_keeps_its_connection_and_an_unknown_certificate_is_a_connect_error(
    nursery: trio.Nursery,
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    accepted = 0

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        nonlocal accepted
        accepted += 1
        buffer = bytearray()
        with contextlib.suppress(trio.BrokenResourceError):
            while await _read_request(stream, buffer):
                await stream.send_all(OK)

    listeners = await nursery.start(functools.partial(
        trio.serve_ssl_over_tcp, handler, 0, server_ctx, host="127.0.0.1"))
    url = f"https://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}"
    target = Target(url, ssl_context=client_ctx)
    with trio.fail_after(10):
        for _ in range(3):
            assert await _exchange(target) == (200, b"ok")
        assert accepted == 1
        with pytest.raises(WireError) as untrusted:
            await _exchange(Target(url))  # the system's CAs do not know trustme's
    assert untrusted.value.kind == "connect"
    await target.aclose()
