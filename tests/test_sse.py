"""EventSplitter: the proxy forwards whole SSE events only, however the upstream reads fall."""

from hypothesis import given
from hypothesis import strategies as st

from lb.http.sse import MAX_PARTIAL_EVENT, EventSplitter


def cut_points(stream: bytes) -> list[int]:
    """Reference: the offsets just past each blank line, read the slow way. A line ends in CRLF,
    LF or CR; a CR at the very end counts as a line ending (an LF after it would join it)."""
    points = []
    i = line_start = 0
    while i < len(stream):
        if stream[i] in b"\r\n":
            end = i + 2 if stream[i : i + 2] == b"\r\n" else i + 1
            if i == line_start:
                points.append(end)
            i = line_start = end
        else:
            i += 1
    return points


TOKENS = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b"d", b"a", b":", b" ", b"data: x\n\n", b'data: {"y": 1}\r\n\r\n',
     b"data: z\r\r", b": ping\n\n", b"data: [DONE]\n\n", b'data: {"text": "no line end',
     b"data: a long line, so a long event\n"]
)
CHUNKS = st.lists(st.lists(TOKENS, max_size=6).map(b"".join), max_size=20)


@given(CHUNKS, st.one_of(st.integers(0, 30), st.just(MAX_PARTIAL_EVENT)))
def test_every_byte_comes_out_once_in_order(chunks: list[bytes], max_partial: int) -> None:
    splitter = EventSplitter(max_partial)
    out = [splitter.feed(chunk) for chunk in chunks]
    out.append(splitter.flush())
    assert b"".join(out) == b"".join(chunks)
    assert splitter.pending == 0
    assert splitter.flush() == b""


@given(CHUNKS)
def test_returns_exactly_up_to_the_last_boundary(chunks: list[bytes]) -> None:
    splitter = EventSplitter()
    stream = emitted = b""
    for chunk in chunks:
        out = splitter.feed(chunk)
        stream += chunk
        emitted += out
        points = cut_points(stream)
        if out:  # it ends on a boundary...
            assert len(emitted) in points
        # ...the last one: what is held holds none
        assert len(emitted) == max(points, default=0)
        assert splitter.pending == len(stream) - len(emitted)
        assert splitter.at_boundary


@given(CHUNKS, st.integers(0, 30))
def test_at_boundary_is_true_only_on_a_boundary(chunks: list[bytes], max_partial: int) -> None:
    splitter = EventSplitter(max_partial)
    stream = emitted = b""
    for chunk in chunks:
        emitted += splitter.feed(chunk)
        stream += chunk
        assert splitter.pending <= max_partial
        if splitter.at_boundary and emitted:
            assert len(emitted) in cut_points(stream)


def test_no_boundary_returns_nothing_and_holds_everything() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a"') == b""  # not one byte of it
    assert splitter.pending == 10
    assert splitter.feed(b": 1}\n") == b""  # one line ending is not a blank line
    assert splitter.feed(b"\n") == b'data: {"a": 1}\n\n'
    assert splitter.pending == 0


def test_an_event_split_across_reads_comes_out_whole() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: 1\n\ndata: 2\n") == b"data: 1\n\n"
    assert splitter.pending == len(b"data: 2\n")
    assert splitter.feed(b"\ndata: 3") == b"data: 2\n\n"
    assert splitter.flush() == b"data: 3"  # the stream ended mid-event
    assert not splitter.at_boundary


def test_crlf_stream_comes_out_event_by_event() -> None:
    splitter = EventSplitter()
    reads = [b"data: ", b"a\r\n", b"\r\ndata", b": b\r\n\r\n"]
    assert [splitter.feed(read) for read in reads] == [
        b"", b"", b"data: a\r\n\r\n", b"data: b\r\n\r\n"
    ]
    assert splitter.pending == 0


def test_a_crlf_split_after_its_cr_loses_no_time() -> None:
    # A lone CR already ends the line, so the event goes at once; the LF follows it at once.
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\n\r") == b"data: a\r\n\r"
    assert splitter.feed(b"\ndata: b\r") == b"\n"
    assert splitter.feed(b"\n\r\n") == b"data: b\r\n\r\n"
    assert splitter.pending == 0


def test_cr_and_mixed_line_endings() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\rdata: b\r") == b"data: a\r\r"
    assert splitter.feed(b"\r") == b"data: b\r\r"
    assert splitter.feed(b"data: c\n\r\ndata: d\r\n\nx") == b"data: c\n\r\ndata: d\r\n\n"
    assert splitter.flush() == b"x"


def test_an_event_longer_than_max_partial_passes_through() -> None:
    splitter = EventSplitter(max_partial=10)
    assert splitter.feed(b"data: 12") == b""
    assert splitter.feed(b"34") == b""  # 10 bytes held: not more than max_partial
    assert splitter.feed(b"5") == b"data: 12345"  # 11 would be: all of it, as it is
    assert not splitter.at_boundary
    assert splitter.pending == 0
    assert splitter.feed(b"\n\ndata: 0123456789") == b"\n\ndata: 0123456789"
    assert splitter.feed(b"\n\ndata: 1\n\ndata: 2") == b"\n\ndata: 1\n\n"
    assert splitter.at_boundary
    assert splitter.pending == 7


def test_whole_events_come_back_uncopied() -> None:
    splitter = EventSplitter()
    data = b"data: 1\n\ndata: 2\n\n"
    assert splitter.feed(data) is data
    crlf = b"data: 1\r\n\r\n"
    assert splitter.feed(crlf) is crlf
