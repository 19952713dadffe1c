"""`POST /v1/messages` and `/v1/messages/count_tokens`: the Anthropic dialect's edge.

Claude-style clients use lb in front of any node: the request is translated to an OpenAI chat
body (`anthropic_translate`), routed and dispatched like `/v1/chat/completions` (the same
`route_request` and `Dispatcher`), and the OpenAI answer coming out of dispatch is written in
Anthropic's dialect by `AnthropicSink`, a `ResponseSink` wrapper. Every `LBError` is answered
here in Anthropic's shape (the server would write OpenAI's): before the head as status + JSON,
after it as `event: error`. Anthropic's headers stay here; the client's key goes on only to
nodes that `forward_auth`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import attrs
import orjson
import trio

from lb.api import anthropic_translate as tr
from lb.api.proxy import CLIENT_CLOSED, finish_trace, parse_body, route_request
from lb.errors import BadRequest, LBError
from lb.http.routes import Router
from lb.http.sse import SSE_HEADERS
from lb.http.types import JSON_HEADERS, ClientGone, Headers, Request, Response, ResponseSink
from lb.obs.observer import Trace
from lb.routing.dispatch import Dispatcher

# Headers lb writes itself on a translated answer (the body is a new one).
_REWRITTEN = frozenset({b"content-length", b"content-type", b"content-encoding"})


def error_response(error: LBError) -> Response:
    body = orjson.dumps(tr.lb_error_payload(error))
    return Response(error.status, error_headers(error, body), body)


def error_headers(error: LBError, body: bytes) -> Headers:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if error.retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(error.retry_after))).encode()))
    return headers


def _to_node(request: Request, body: bytes) -> Request:
    """The request as routing sees it: the translated body, without the `anthropic-*` headers
    (`anthropic-version`, `anthropic-beta`). The client's key (`x-api-key`, or a bearer token)
    becomes the request's `Authorization`, which `route_request` keeps apart from the node's
    headers: it reaches only a node configured with `forward_auth`, as on the OpenAI edge."""
    headers = [
        item for item in request.headers
        if item[0] != b"x-api-key" and not item[0].startswith(b"anthropic-")
    ]
    key = request.header(b"x-api-key")
    if key is not None and request.header(b"authorization") is None:
        headers.append((b"authorization", b"Bearer " + key))
    return attrs.evolve(request, body=body, headers=headers)


class AnthropicSink:
    """A ResponseSink that writes dispatch's OpenAI answer in Anthropic's dialect.

    The head dispatch records says what comes: a 200 event stream goes through
    `ChatToMessagesStream` event by event; a JSON body (dispatch sends a whole answer in one
    `send`) becomes a message, or an Anthropic error for a node's error answer, or, when the
    client asked to stream and the node answered JSON anyway, the message's event stream."""

    __slots__ = ("_headers", "_mode", "_model", "_msg_id", "_sink", "_status", "_stop",
                 "_stream", "_translator")

    def __init__(
        self, sink: ResponseSink, *, model: str, msg_id: str, stream: bool,
        input_tokens: int, stop_sequences: Sequence[str],
    ) -> None:
        self._sink = sink
        self._model = model
        self._msg_id = msg_id
        self._stream = stream
        self._stop = tuple(stop_sequences)
        self._status = 200
        self._headers: Headers = []
        self._mode: str | None = None  # set by the first send: "sse" or "json"
        self._translator: tr.ChatToMessagesStream | None = None
        if stream:
            self._translator = tr.ChatToMessagesStream(model, msg_id, input_tokens, self._stop)

    @property
    def committed(self) -> bool:
        # Dispatch's view: once it sent bytes, it may not fail over (as with the real sink).
        return self._mode is not None or self._sink.committed

    @property
    def streaming(self) -> bool:
        """The answer is going out as an event stream (an error must be an event then)."""
        return self._mode == "sse" and self._sink.committed

    def head(self, status: int, headers: Headers) -> None:
        if self.committed:
            raise RuntimeError("the response head already went out")
        self._status, self._headers = status, headers

    def tag(self, name: bytes, value: bytes) -> None:
        self._sink.tag(name, value)

    def cancel_on_drain(self, scope: trio.CancelScope) -> None:
        self._sink.cancel_on_drain(scope)

    async def send(self, data: bytes) -> None:
        if self._mode == "sse":
            assert self._translator is not None
            out = self._translator.feed(data)
            if out:
                await self._sink.send(out)
            return
        if self._mode is not None:
            raise RuntimeError("a JSON answer comes in one send")
        kept = [item for item in self._headers if item[0] not in _REWRITTEN]
        if self._status == 200 and _is_event_stream(self._headers):
            self._mode = "sse"
            if self._translator is None:  # the node streamed though it was not asked to
                raise UpstreamProtocolError(
                    "The node streamed its answer to a request that did not ask for a stream"
                )
            self._sink.head(200, [*kept, *SSE_HEADERS])
            await self.send(data)
            return
        self._mode = "json"
        status = self._status
        if 200 <= status < 300:
            message = tr.chat_to_message(_loads(data), self._model, self._msg_id, self._stop)
            if self._stream:
                body, headers = tr.message_events(message), [*kept, *SSE_HEADERS]
            else:
                body, headers = orjson.dumps(message), [*kept, *JSON_HEADERS]
        else:  # the node's own error answer (a 4xx dispatch passes on): in Anthropic's words
            body = orjson.dumps(tr.error_payload(status, tr.node_error_message(data)))
            headers = [*kept, *JSON_HEADERS]
        if not self._stream or status >= 300:
            headers.append((b"content-length", str(len(body)).encode()))
        self._sink.head(status, headers)
        await self._sink.send(body)

    async def finish(self) -> None:
        """After dispatch returned: end a stream the node ended without `[DONE]`."""
        if self._mode == "sse" and self._translator is not None:
            out = self._translator.close()
            if out:
                await self._sink.send(out)

    def error_event(self, error: LBError) -> bytes:
        assert self._translator is not None
        return self._translator.error(error)


class UpstreamProtocolError(LBError):
    """The node's answer is not one the translation can use."""

    status = 502
    code = "upstream_protocol_error"


def _is_event_stream(headers: Headers) -> bool:
    return any(
        key == b"content-type" and value.startswith(b"text/event-stream")
        for key, value in headers
    )


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


async def _answer(
    dispatcher: Dispatcher, intent: Any, trace: Trace, options: dict[str, Any],
    sink: ResponseSink,
) -> None:
    """Dispatch through an AnthropicSink, and answer every LBError in Anthropic's shape: a JSON
    error before the head went out, `event: error` after it. The observers hear of it once."""
    out = AnthropicSink(sink, **options)
    try:
        await dispatcher.execute(intent, out, trace)
        await out.finish()
    except LBError as exc:
        trace.error = exc.code
        if out.streaming:
            await sink.send(out.error_event(exc))
        elif not sink.committed:
            trace.status = exc.status
            body = orjson.dumps(tr.lb_error_payload(exc))
            sink.head(exc.status, error_headers(exc, body))
            await sink.send(body)
        else:
            raise  # a JSON answer half written: the server closes the connection
    except (ClientGone, trio.Cancelled):
        trace.client_gone = True
        if not sink.committed:
            trace.status = CLIENT_CLOSED
        raise
    finally:
        finish_trace(dispatcher.observer, trace)


def add_routes(router: Router, dispatcher: Dispatcher) -> None:
    observer = dispatcher.observer

    async def messages(request: Request) -> Response:
        trace = Trace(
            request.request_id, "chat", False, "", trio.current_time(), request.client,
            request.path,
        )
        observer.started(trace)
        try:
            body = parse_body(request.body)
            tr.validate_request(body)
            chat = tr.messages_to_chat(body)
            stream = chat.get("stream") is True
            trace.stream, trace.requested_model = stream, body["model"]
            intent = route_request(
                _to_node(request, orjson.dumps(chat)), "chat", chat, stream, trace.arrival,
                dispatcher.allowed,
            )
        except LBError as exc:  # answered before anything was routed
            trace.status, trace.error = exc.status, exc.code
            finish_trace(observer, trace)
            return error_response(exc)
        options = {
            "model": body["model"],
            "msg_id": "msg_" + request.request_id.replace("-", ""),
            "stream": stream,
            # A cheap estimate for message_start; the node's count comes in message_delta.
            "input_tokens": len(request.body) // 4,
            "stop_sequences": chat.get("stop", ()),
        }
        return Response(stream=functools.partial(_answer, dispatcher, intent, trace, options))

    async def count_tokens(request: Request) -> Response:
        """An estimate (about 4 bytes of JSON per token), not a tokenizer's count."""
        try:
            body = parse_body(request.body)
            messages = body.get("messages")
            if not isinstance(body.get("model"), str) or not isinstance(messages, list):
                raise BadRequest("model and messages are required", param="messages")
        except LBError as exc:
            return error_response(exc)
        return Response.json({"input_tokens": tr.estimate_tokens(body)})

    router.add("POST", "/v1/messages", messages)
    router.add("POST", "/v1/messages/count_tokens", count_tokens)
