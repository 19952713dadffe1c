"""The OpenAI dialect of errors: an `LBError` becomes `{"error": {"message", "type", "param",
"code"}}` with its status, or, inside a stream that already began, one `data: {"error": …}`
event followed by `data: [DONE]`."""

from __future__ import annotations

import math
from typing import Any

import orjson

from lb.errors import LBError, MethodNotAllowed
from lb.http.sse import error_event
from lb.http.types import JSON_HEADERS, Headers

# The `type` OpenAI and its compatible servers use for each status.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_payload(error: LBError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.type or error_type(error.status),
            "param": error.param,
            "code": error.code,
        }
    }


def error_body(error: LBError) -> bytes:
    return orjson.dumps(error_payload(error))


def error_headers(error: LBError, body: bytes) -> Headers:
    """The head of an error answer (content-length included)."""
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if error.retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(error.retry_after))).encode()))
    headers += error.headers
    if isinstance(error, MethodNotAllowed):
        headers.append((b"allow", ", ".join(error.allowed).encode()))
    elif error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    return headers


def stream_error(error: LBError) -> bytes:
    """The error event (and `[DONE]`) for a stream whose head already went out."""
    return error_event(error_payload(error))
