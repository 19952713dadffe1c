"""The `LBError` family: what went wrong, in domain terms, with no wire format.

Routing, policy and the HTTP layer raise these; the client's dialect turns them into bytes at
the edge (`lb.http.errors` for OpenAI JSON and the in-stream error event). Each class carries a
status hint and a code; an instance may override both (the mock node plays arbitrary errors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import attrs

__all__ = [
    "AllUpstreamsFailed",
    "AttemptFailure",
    "BadRequest",
    "CapacityExceeded",
    "ContextWindowExceeded",
    "DeadlineExceeded",
    "Forbidden",
    "InternalError",
    "LBError",
    "LocalResourcesExhausted",
    "MethodNotAllowed",
    "ModelNotFound",
    "ModelUnavailable",
    "NoHealthyNode",
    "NodeNotFound",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "ShuttingDown",
    "Unauthorized",
    "UnsupportedMediaType",
    "UpstreamStreamError",
]


class LBError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str | None] = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: float | None = None,
        status: int | None = None, code: str | None = None, type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after  # seconds; the edge sends it as Retry-After
        self.type = type  # the OpenAI `type`, when the status does not say it
        if status is not None:
            self.status = status  # type: ignore[misc]  # an instance may override the hint
        if code is not None:
            self.code = code  # type: ignore[misc]


class BadRequest(LBError):
    status = 400
    code = "invalid_request"


class ContextWindowExceeded(BadRequest):
    """The prompt is longer than the model's known context window (and no fallback's)."""

    code = "context_length_exceeded"


class Unauthorized(LBError):
    status = 401
    code = "invalid_api_key"


class Forbidden(LBError):
    status = 403
    code = "forbidden"


class NotFound(LBError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, message: str, *, requested: str | None = None) -> None:
        super().__init__(message, param="model")
        self.requested = requested


class NodeNotFound(NotFound):
    code = "node_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="node")


class MethodNotAllowed(LBError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allowed: Sequence[str]) -> None:
        super().__init__(message)
        self.allowed = tuple(allowed)


class RequestTimeout(LBError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(LBError):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(LBError):
    status = 415
    code = "unsupported_media_type"


class CapacityExceeded(LBError):
    """Every node that could serve the request is at its concurrency cap (lb's own queue)."""

    status = 429
    code = "capacity_exceeded"


class RateLimited(LBError):
    """Every node asked answered 429: the nodes' own rate limits."""

    status = 429
    code = "rate_limited"


class InternalError(LBError):
    pass


@attrs.frozen
class AttemptFailure:
    """One failed attempt, as a client may see it: the node by host:port and a short reason."""

    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"


class AllUpstreamsFailed(LBError):
    status = 502
    code = "all_upstreams_failed"

    def __init__(self, attempts: Sequence[AttemptFailure]) -> None:
        listing = "; ".join(map(str, attempts))
        super().__init__(f"All {len(attempts)} attempt(s) failed: {listing}")
        self.attempts = tuple(attempts)


class UpstreamStreamError(LBError):
    """The node failed after the stream began (only an in-stream error event can say so)."""

    status = 502
    code = "upstream_stream_error"


class NoHealthyNode(LBError):
    status = 503
    code = "no_healthy_node"


class ModelUnavailable(LBError):
    """A model lb served until recently has no healthy node right now (busy, restarting)."""

    status = 503
    code = "model_unavailable"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, param="model", retry_after=retry_after)


class LocalResourcesExhausted(LBError):
    """lb itself ran out of file descriptors or memory: not any node's fault."""

    status = 503
    code = "lb_overloaded"


class ShuttingDown(LBError):
    status = 503
    code = "shutting_down"


class DeadlineExceeded(LBError):
    status = 504
    code = "deadline_exceeded"
