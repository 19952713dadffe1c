"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

from typing import Any

import orjson

from lb.http.types import JSON_HEADERS, Headers, Response

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
    429: "rate_limit_error",
    431: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_payload(
    message: str, *, status: int, code: str | None = None, param: str | None = None,
    type: str | None = None,
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type or error_type(status),
            "param": param,
            "code": code,
        }
    }


class HTTPError(Exception):
    """Raised anywhere under a handler; the server answers with the OpenAI error body."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None,
        type: str | None = None, headers: Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.headers = headers or []

    def payload(self) -> dict[str, Any]:
        return error_payload(
            self.message, status=self.status, code=self.code, param=self.param, type=self.type
        )

    def response(self) -> Response:
        return Response(self.status, [*JSON_HEADERS, *self.headers], orjson.dumps(self.payload()))


def error_response(
    status: int, message: str, *, code: str | None = None, param: str | None = None,
    headers: Headers | None = None,
) -> Response:
    return HTTPError(status, message, code=code, param=param, headers=headers).response()
