"""Compressed request bodies: decoded exactly, bounded, and refused clearly."""

from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from lb.http.encoding import decode


@given(st.binary(max_size=5000))
def test_gzip_and_deflate_round_trip(body: bytes) -> None:
    assert decode(gzip.compress(body), b"gzip", len(body)) == body
    assert decode(zlib.compress(body), b"Deflate", len(body)) == body
    assert decode(body, b"identity", 0) == body


@given(st.binary(min_size=1, max_size=5000))
def test_one_byte_over_the_limit_is_413(body: bytes) -> None:
    with pytest.raises(PayloadTooLarge):
        decode(gzip.compress(body), b"gzip", len(body) - 1)


def test_a_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * 100_000_000)
    with pytest.raises(PayloadTooLarge):
        decode(bomb, b"gzip", 1_000_000)


@pytest.mark.parametrize("packed", [b"not gzip at all", gzip.compress(b"{}", mtime=0)[:-6]])
def test_broken_or_truncated_streams_are_400(packed: bytes) -> None:
    with pytest.raises(BadRequest):
        decode(packed, b"gzip", 1000)


def test_unknown_codings_are_415() -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        decode(b"x", b"br", 1000)
    assert caught.value.status == 415
