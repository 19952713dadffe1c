"""Server-sent events framing, as OpenAI streams use it (`data: <json>\n\n`, `data: [DONE]`)."""

from __future__ import annotations

from typing import Any

import orjson

from lb.http.types import Headers

DONE = b"data: [DONE]\n\n"
SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]


def event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_event(payload: dict[str, Any]) -> bytes:
    """One standard error event followed by the end marker (for a stream that already began)."""
    return event(payload) + DONE


MAX_PARTIAL_EVENT = 1024 * 1024  # an unfinished event held longer than this passes through as is

_CR = 0x0D
_LF = 0x0A


class EventSplitter:
    """Cuts an upstream SSE byte stream at event boundaries, so the proxy forwards whole events
    only and an error event it appends after a failure never lands inside half an event.

    Pure, no I/O: call ``feed`` once per upstream read and ``flush`` at the end of the stream.
    Lines may end in CRLF, LF or CR, and an event ends at a blank line, that is at a line ending
    right after another one: ``\\n\\n``, ``\\r\\n\\r\\n``, ``\\r\\r``, ``\\n\\r\\n``, ... A CR
    at the end of the bytes so far counts as a line ending (it is one, whether or not an LF
    follows); if the LF comes in the next read, ``feed`` returns it at once.
    """

    __slots__ = ("_at_boundary", "_held", "_max_partial")

    def __init__(self, max_partial: int = MAX_PARTIAL_EVENT) -> None:
        self._max_partial = max_partial
        self._held = bytearray()  # grows in place: a big event in many reads costs O(size)
        self._at_boundary = True

    @property
    def pending(self) -> int:
        """Bytes held: the start of an event whose end has not arrived yet."""
        return len(self._held)

    @property
    def at_boundary(self) -> bool:
        """Whether everything ``feed`` returned so far ends at an event boundary, so an error
        event may follow it as is. False only after the ``max_partial`` overflow passed part of
        an event through (until a later boundary is returned) or after ``flush`` gave back an
        unfinished event."""
        return self._at_boundary

    def feed(self, data: bytes) -> bytes:
        """Return the bytes up to and including the last event boundary in what is held plus
        ``data`` (``b""`` if there is none), and hold the rest; or return all of it, holding
        nothing, when the rest would be longer than ``max_partial``."""
        held = self._held
        if not held:
            if data.endswith(b"\n\n"):  # the common case: whole events, nothing held; no copy
                self._at_boundary = True
                return data
            if not data:
                return data
            cut = _last_cut(data, 0, self._at_boundary)
            if cut == len(data):
                self._at_boundary = True
                return data
            if len(data) - cut > self._max_partial:
                self._at_boundary = False
                return data
            held += memoryview(data)[cut:]
            if not cut:
                return b""
            self._at_boundary = True
            return data[:cut]
        # What is held contains no boundary, but one may begin in its last byte.
        start = len(held) - 1
        held += data
        cut = _last_cut(held, start, False)
        if len(held) - cut > self._max_partial:
            self._at_boundary = False
            return self.flush()
        if not cut:
            return b""
        self._at_boundary = True
        if cut == len(held):
            out = bytes(held)
            held.clear()
        else:
            out = bytes(held[:cut])
            del held[:cut]
        return out

    def flush(self) -> bytes:
        """Return and forget whatever is held (at the end of the stream: an unfinished event)."""
        out = bytes(self._held)
        if out:
            self._held.clear()
            self._at_boundary = False
        return out


def _last_cut(buf: bytes | bytearray, start: int, line_start: bool) -> int:
    """The offset just past the last blank line in ``buf`` whose line ending comes after
    ``buf[start]``, or 0 if there is none. ``line_start``: ``buf`` begins a line (it follows an
    event boundary), so a line ending at its very start ends a blank line too."""
    if buf.find(b"\r", start) < 0:  # LF only, as OpenAI-style servers send: one search
        cut = buf.rfind(b"\n\n", start) + 2
        if cut >= 2:
            return cut
        return 1 if line_start and buf[:1] == b"\n" else 0
    n = len(buf)
    if buf.endswith(b"\r\n\r\n"):  # the common case with CRLF: no search
        return n
    # A blank line's ending directly follows another line ending, so it shows as an LF or CR
    # followed by an LF or CR, except CR LF, which is one line ending, not two.
    cut = max(buf.rfind(b"\n\n", start), buf.rfind(b"\n\r", start), buf.rfind(b"\r\r", start)) + 2
    if cut >= 2:
        if cut < n and buf[cut - 1] == _CR and buf[cut] == _LF:
            cut += 1  # the blank line ends in CRLF: keep its LF
        return cut
    if line_start and buf[0] in (_CR, _LF):
        return 2 if buf[:2] == b"\r\n" else 1
    return 0
