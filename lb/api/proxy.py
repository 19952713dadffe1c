"""`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: the OpenAI dialect's edge.

It validates the request, turns it into a `RouteRequest` (the only place that reads the HTTP
request for routing) and renders what dispatch raises: before the head went out the server
answers the OpenAI error JSON; after it, one error event and `[DONE]` end the stream.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import orjson
import trio

from lb.errors import BadRequest, LBError
from lb.http.errors import stream_error
from lb.http.routes import Router
from lb.http.types import ClientGone, Headers, Request, Response, ResponseSink
from lb.obs.observer import RequestObserver, Trace
from lb.routing.dispatch import HOP_BY_HOP, Dispatcher
from lb.routing.intent import RouteRequest
from lb.routing.resolve import ModelKind
from lb.routing.strategies import Strategy, parse_strategy

ALL_STRATEGIES = frozenset(Strategy)

# path -> (kind, the field that must be present)
_ENDPOINTS: dict[str, tuple[ModelKind, str]] = {
    "/v1/chat/completions": ("chat", "messages"),
    "/v1/completions": ("completion", "prompt"),
    "/v1/embeddings": ("embedding", "input"),
}
# Not sent on to the node: one hop's headers; lb says the body's type itself (it parsed it as
# JSON); compressed answers could not be spliced; lb sends its own x-request-id; a browser's
# cookies for lb's origin are none of a node's business, and neither is the client's key for
# lb (a node gets lb's credential, or the client's only when configured to: `forward_auth`).
_NOT_TO_NODE = HOP_BY_HOP | {
    b"accept-encoding", b"content-type", b"x-request-id", b"cookie", b"authorization",
}
_JSON = (b"content-type", b"application/json")
CLIENT_CLOSED = 499  # the status nginx logs for a client that left before its answer
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# A session id is hashed and may be logged: visible ASCII only.
_SESSION_ID = re.compile(rb"[\x21-\x7e]{1,256}")


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise BadRequest("Request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object", code="invalid_json")
    return body


def validate(body: dict[str, Any], kind: ModelKind, required: str) -> bool:
    """Check the fields lb itself relies on; returns whether the client asked to stream."""
    model = body.get("model")
    if model is None:
        raise BadRequest("Missing required parameter: 'model'", code="missing_parameter",
                         param="model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", code="invalid_type",
                         param="model")
    if body.get(required) is None:
        raise BadRequest(f"Missing required parameter: '{required}'",
                         code="missing_parameter", param=required)
    if kind == "chat" and not (isinstance(body["messages"], list) and body["messages"]):
        raise BadRequest("'messages' must be a non-empty array", code="invalid_type",
                         param="messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest("'stream' must be true or false", code="invalid_type", param="stream")
    if kind == "embedding" and stream:
        raise BadRequest("Embeddings cannot be streamed", code="invalid_value", param="stream")
    return bool(stream)


def route_request(
    request: Request, kind: ModelKind, body: dict[str, Any], stream: bool, arrival: float,
    allowed: frozenset[Strategy] = ALL_STRATEGIES,
) -> RouteRequest:
    """The HTTP request as routing sees it; the client may choose a strategy of `allowed`."""
    session = request.header(b"x-session-id")
    if session is not None and _SESSION_ID.fullmatch(session) is None:
        raise BadRequest(
            "x-session-id must be 1 to 256 visible ASCII characters",
            code="invalid_header", param="x-session-id",
        )
    forced = request.query_params().get("node") if request.query else None
    raw = request.body
    rewrite = False
    strategy = None
    header = request.header(b"x-lb-strategy")
    if header is not None:
        strategy = _strategy(header.decode("latin-1"), allowed, "x-lb-strategy")
    if "strategy" in body:  # lb's, not the node's: removed (the header wins over it)
        chosen = body["strategy"]
        if not isinstance(chosen, str):
            raise BadRequest("'strategy' must be a string", code="invalid_type",
                             param="strategy")
        if strategy is None:
            strategy = _strategy(chosen, allowed, "strategy")
        body = {key: value for key, value in body.items() if key != "strategy"}
        rewrite = True
    if "max_completion_tokens" in body and "max_tokens" not in body:
        # llama-cpp-python and older servers know only max_tokens and would generate without
        # a limit.
        body = {**body, "max_tokens": body["max_completion_tokens"]}
        rewrite = True
    if rewrite:  # only then is the body re-serialised
        raw = orjson.dumps(body)
    return RouteRequest(
        model=body["model"],
        kind=kind,
        stream=stream,
        body=body,
        raw=raw,
        request_id=request.request_id,
        arrival=arrival,
        budget=_budget(request),
        session=session.decode("ascii") if session else None,
        node=forced or None,
        prefer_small=request.header(b"x-prefer-small") in (b"1", b"true"),
        strategy=strategy,
        headers=node_headers(request),
        authorization=request.header(b"authorization"),
    )


def _strategy(name: str, allowed: frozenset[Strategy], param: str) -> Strategy:
    """The strategy a client asked for, if it may (400 otherwise)."""
    try:
        strategy = parse_strategy(name)
    except ValueError:
        raise BadRequest(
            f"Unknown routing strategy {name!r}; this lb allows: {_names(allowed)}",
            code="invalid_strategy", param=param,
        ) from None
    if strategy not in allowed:
        raise BadRequest(
            f"Routing strategy {name!r} is not allowed here; this lb allows: {_names(allowed)}",
            code="strategy_not_allowed", param=param,
        )
    return strategy


def _names(allowed: frozenset[Strategy]) -> str:
    return ", ".join(s.value.lower() for s in Strategy if s in allowed)


def node_headers(request: Request) -> Headers:
    """The client's end-to-end headers, plus lb's content type and the request id when it is a
    UUID (lb's own are). Headers the client's `Connection` header names are hop-by-hop too
    (RFC 9110 §7.6.1)."""
    dropped = _NOT_TO_NODE
    for key, value in request.headers:
        if key == b"connection":
            named = {token.strip().lower() for token in value.split(b",")}
            dropped = dropped | named
    headers = [_JSON]
    if _UUID.fullmatch(request.request_id):  # nodes may refuse any other shape of id
        headers.append((b"x-request-id", request.request_id.encode()))
    headers += [item for item in request.headers if item[0] not in dropped]
    return headers


def _budget(request: Request) -> float | None:
    header = request.header(b"x-request-budget-ms")
    if header is None:
        return None
    try:
        millis = float(header)
    except ValueError:
        millis = math.nan
    if not math.isfinite(millis) or millis < 0:
        raise BadRequest(
            "x-request-budget-ms must be a number of milliseconds >= 0",
            code="invalid_header", param="x-request-budget-ms",
        )
    return millis / 1000


async def answer(
    dispatcher: Dispatcher, intent: RouteRequest, trace: Trace, sink: ResponseSink
) -> None:
    """Dispatch, and end a stream that broke after its head went out with the error event.
    However it ends, the observers hear of it once."""
    try:
        await dispatcher.execute(intent, sink, trace)
    except LBError as exc:
        trace.error = exc.code
        if not sink.committed:
            trace.status = exc.status
            raise  # the server answers the OpenAI error JSON
        await sink.send(stream_error(exc))
    except (ClientGone, trio.Cancelled):
        trace.client_gone = True  # it left, or stopped reading (a drain's end is an LBError)
        if not sink.committed:
            trace.status = CLIENT_CLOSED
        raise
    finally:
        finish_trace(dispatcher.observer, trace)


def finish_trace(observer: RequestObserver, trace: Trace) -> None:
    """The request ended: its duration, and the observers hear of it (every dialect's edge)."""
    trace.duration = trio.current_time() - trace.arrival
    observer.finished(trace)


def add_routes(router: Router, dispatcher: Dispatcher) -> None:
    observer = dispatcher.observer
    for path, (kind, required) in _ENDPOINTS.items():

        async def forward(
            request: Request, kind: ModelKind = kind, required: str = required
        ) -> Response:
            trace = Trace(
                request.request_id, kind, False, "", trio.current_time(), request.client,
                request.path,
            )
            observer.started(trace)
            try:
                body = parse_body(request.body)
                stream = validate(body, kind, required)
                trace.stream, trace.requested_model = stream, body["model"]
                intent = route_request(
                    request, kind, body, stream, trace.arrival, dispatcher.allowed
                )
            except LBError as exc:  # answered by the server before anything was routed
                trace.status, trace.error = exc.status, exc.code
                finish_trace(observer, trace)
                raise
            return Response(stream=functools.partial(answer, dispatcher, intent, trace))

        router.add("POST", path, forward)
