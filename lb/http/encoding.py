"""Compressed request bodies (`Content-Encoding: gzip` or `deflate`): decoded within the body
limit, so a small bomb cannot become a large body; other codings are refused with 415."""

from __future__ import annotations

import zlib

import trio

from lb.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

# zlib's window bits: gzip framing, or zlib framing (what HTTP calls deflate).
_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
_IN_THREAD_ABOVE = 256 * 1024  # compressed bytes; below this the loop decodes it directly


def decode(body: bytes, coding: bytes, limit: int) -> bytes:
    """`body` decoded; PayloadTooLarge once more than `limit` bytes come out."""
    wbits = _WBITS.get(coding.strip().lower())
    if wbits is None:
        if coding.strip().lower() == b"identity":
            return body
        raise UnsupportedMediaType(
            f"Content-Encoding {coding.decode('latin-1')!r} is not supported; use gzip or deflate"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
        if len(out) > limit or inflater.unconsumed_tail:
            raise PayloadTooLarge(f"Decompressed request body is larger than {limit} bytes")
        out += inflater.flush()
    except zlib.error as exc:
        raise BadRequest(
            f"Request body is not valid {coding.decode('latin-1')}: {exc}", code="invalid_encoding"
        ) from None
    if not inflater.eof:
        raise BadRequest("Request body is a truncated compressed stream", code="invalid_encoding")
    if len(out) > limit:
        raise PayloadTooLarge(f"Decompressed request body is larger than {limit} bytes")
    return out


async def decode_off_loop(body: bytes, coding: bytes, limit: int) -> bytes:
    """`decode`, in a worker thread when the body is large (zlib releases the GIL)."""
    if len(body) <= _IN_THREAD_ABOVE:
        return decode(body, coding, limit)
    return await trio.to_thread.run_sync(decode, body, coding, limit)
