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
