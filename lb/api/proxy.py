"""`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: validate, plan, forward."""

from __future__ import annotations

import functools
from typing import Any

import orjson

from lb.http.errors import HTTPError
from lb.http.routes import Router
from lb.http.types import Request, Response
from lb.routing.dispatch import Dispatcher
from lb.routing.resolve import ModelKind

# path -> (kind, the field that must be present)
_ENDPOINTS: dict[str, tuple[ModelKind, str]] = {
    "/v1/chat/completions": ("chat", "messages"),
    "/v1/completions": ("completion", "prompt"),
    "/v1/embeddings": ("embedding", "input"),
}


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise HTTPError(400, "Request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        message = f"Request body is not valid JSON: {exc}"
        raise HTTPError(400, message, code="invalid_json") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "Request body must be a JSON object", code="invalid_json")
    return body


def validate(body: dict[str, Any], kind: ModelKind, required: str) -> bool:
    """Check the fields lb itself relies on; returns whether the client asked to stream."""
    model = body.get("model")
    if model is None:
        raise HTTPError(400, "Missing required parameter: 'model'", code="missing_parameter",
                        param="model")
    if not isinstance(model, str) or not model:
        raise HTTPError(400, "'model' must be a non-empty string", code="invalid_type",
                        param="model")
    if body.get(required) is None:
        raise HTTPError(400, f"Missing required parameter: '{required}'",
                        code="missing_parameter", param=required)
    if kind == "chat" and not (isinstance(body["messages"], list) and body["messages"]):
        raise HTTPError(400, "'messages' must be a non-empty array", code="invalid_type",
                        param="messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise HTTPError(400, "'stream' must be true or false", code="invalid_type", param="stream")
    if kind == "embedding" and stream:
        raise HTTPError(400, "Embeddings cannot be streamed", code="invalid_value", param="stream")
    return bool(stream)


def add_routes(router: Router, dispatcher: Dispatcher) -> None:
    for path, (kind, required) in _ENDPOINTS.items():

        async def forward(
            request: Request, path: str = path, kind: ModelKind = kind, required: str = required
        ) -> Response:
            body = parse_body(request.body)
            stream = validate(body, kind, required)
            plan = dispatcher.plan(
                request, path=path, kind=kind, body=body, raw=request.body, stream=stream
            )
            response = Response()
            response.stream = functools.partial(dispatcher.execute, plan, response)
            return response

        router.add("POST", path, forward)
