"""Counting a stream's server-sent events as they complete, whatever the read boundaries.

`lb bench` times a stream by the reads that complete an event (TTFT, inter-token gaps), so it
must see an event end where the event stream format says it ends (a blank line, after CRLF, LF
or CR line endings), even when a read stops inside a `data:` field or between the two bytes
of a CRLF. lb's own `EventSplitter` (which the proxy forwards whole events with) finds the
boundaries; this counts the events in what it returns. Only what the statistics need is kept:
the count, whether the stream's end came (`data: [DONE]`, or an Anthropic `message_stop`), the
data of the last JSON event that mentions usage, and whether an error event came.
"""

from __future__ import annotations

import sys

import orjson

from lb.http.sse import EventSplitter


class EventCounter:
    """Feed the body's bytes in any pieces; `feed` answers how many events each piece ended.
    An event is a block with at least one `data` line (comments and other fields alone are
    not events); an unfinished event at the end of the stream is no event."""

    __slots__ = ("_splitter", "done", "error", "events", "usage")

    def __init__(self) -> None:
        self.events = 0
        self.done = False  # the end came: `data: [DONE]`, or Anthropic's `message_stop`
        self.usage = b""  # the data of the last JSON event that mentions "usage"
        self.error = False  # an event whose data is a JSON error ({"error" or Anthropic's)
        # Never pass part of an event through: an event cut in two would count twice.
        self._splitter = EventSplitter(max_partial=sys.maxsize)

    def feed(self, piece: bytes) -> int:
        """Take the next bytes of the body; the number of events they ended."""
        whole = self._splitter.feed(piece)
        if not whole:
            return 0
        if b"\r" in whole:
            # Whole events only, so no CRLF is cut here; a lone LF first (the end of a CRLF
            # whose CR ended the last piece) is one more blank line between events: a no-op.
            whole = whole.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        marked = b"\n\n" + whole
        count = whole.count(b"\n\n")
        if (whole.count(b"\n") == 2 * count and marked.count(b"\n\ndata: ") == count
                and whole.endswith(b"\n\n") and b'"message_stop"' not in whole
                and not (b'"type"' in whole and b'"error"' in whole)):  # Anthropic's: below
            # The usual stream: every event one `data: ` line. Searched in C, not per event.
            if marked.find(b'\n\ndata: {"error"') >= 0:
                self.error = True
            if marked.find(b"\n\ndata: [DONE]\n\n") >= 0:
                self.done = True
            self._last_usage(marked)
            self.events += count
            return count
        blocks = whole.split(b"\n\n")
        blocks.pop()  # what follows the last blank line: nothing, or more blank lines
        ended = 0
        for block in blocks:
            data = _data(block)
            if data is None:
                continue
            ended += 1
            if data[:1] == b"{":
                if _error(data):
                    self.error = True
                elif b'"usage"' in data:
                    self.usage = data
                if b'"message_stop"' in data and _anthropic_type(data) == "message_stop":
                    self.done = True  # the end of an Anthropic Messages stream (no [DONE])
            elif data == b"[DONE]":
                self.done = True
        self.events += ended
        return ended

    def _last_usage(self, marked: bytes) -> None:
        """The last JSON event mentioning usage in `marked` (b"\n\n" and events of one
        `data: ` line each), if any."""
        before = len(marked)
        while (at := marked.rfind(b'"usage"', 0, before)) >= 0:
            block = marked.rfind(b"\n\n", 0, at)  # the blank line before the event
            data = marked[block + 8:marked.find(b"\n\n", at)]  # after "\n\ndata: "
            if data[:1] == b"{" and not _error(data):
                self.usage = data
                return
            before = block


def _error(data: bytes) -> bool:
    """An OpenAI error event (`{"error": ...}`) or an Anthropic one (`{"type": "error"}`)."""
    return data[:8] == b'{"error"' or (
        b'"error"' in data and _anthropic_type(data) == "error"
    )


def _anthropic_type(data: bytes) -> object:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return event.get("type") if isinstance(event, dict) else None


def _data(block: bytes) -> bytes | None:
    """The data of an event's lines (data lines joined with LF), None if it has none."""
    values = []
    for line in block.split(b"\n"):
        if line[:5] == b"data:":
            values.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line == b"data":
            values.append(b"")
    return b"\n".join(values) if values else None
