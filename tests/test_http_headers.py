"""`sendable`: the one check of a header list that lets h11 skip its own, per header."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.http.headers import sendable

names = st.binary(min_size=0, max_size=12)
# Values as h11's grammar sees them: no whitespace at either end (lb never sends any).
values = st.binary(max_size=16).map(lambda v: v.strip(b" \t"))
header_lists = st.lists(st.tuples(names, values), max_size=6)


def h11_accepts(headers: list[tuple[bytes, bytes]]) -> bool:
    try:
        h11.Response(status_code=200, headers=headers)
    except h11.LocalProtocolError:
        return False
    return True


@given(header_lists)
def test_what_is_sendable_h11_accepts(headers: list[tuple[bytes, bytes]]) -> None:
    plain = [(n, v) for n, v in headers if n.lower() not in (b"content-length",
                                                             b"transfer-encoding")]
    if sendable(plain):
        assert h11_accepts(plain)
    # And the other way for printable values (so the check saves h11's work where it can).
    elif h11_accepts(plain) and all(v.isascii() and v.translate(None, bytes(range(32)) + b"\x7f")
                                    == v for _, v in plain):
        raise AssertionError(f"h11 accepts {plain!r} but sendable() does not")


@pytest.mark.parametrize("headers", [
    [(b"x-selected-model", b"evil\r\nset-cookie: a=b")],
    [(b"x-a", b"ok"), (b"x-b", b"line\nbreak")],
    [(b"x-a", b"nul\x00")],
    [(b"bad name", b"v")],
    [(b"", b"v")],
    [(b"x-a:", b"v")],
    [(b"x-a", b"ok"), (b"x\r\ny", b"v")],
])
def test_what_could_split_a_header_or_a_response_is_not_sendable(
    headers: list[tuple[bytes, bytes]],
) -> None:
    assert not sendable(headers)
    with pytest.raises(h11.LocalProtocolError):  # and h11 then says what is wrong
        h11.Response(status_code=200, headers=headers)


def test_controls_h11_lets_through_go_to_h11s_own_check() -> None:
    assert not sendable([(b"x-a", b"del\x7f")])
    assert not sendable([(b"x-a", b"bell\x07")])


def test_checked_headers_are_written_as_h11_writes_them() -> None:
    headers = [(b"Content-Type", b"application/json"), (b"x-ratelimit-reset-requests", b"1.5s"),
               (b"content-length", b"2"), (b"x-obs", b"caf\xc3\xa9\tok")]
    assert sendable(headers)
    fast, slow = h11.Connection(h11.SERVER), h11.Connection(h11.SERVER)
    for conn in (fast, slow):
        conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        conn.next_event()
    assert fast.send(h11.Response(status_code=200, headers=headers, reason=b"OK",
                                  _parsed=True)) == \
        slow.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
    # The checks h11 keeps with _parsed: the body's framing.
    with pytest.raises(h11.LocalProtocolError):
        h11.Response(status_code=200, headers=[(b"content-length", b"1"),
                                               (b"content-length", b"2")], _parsed=True)
