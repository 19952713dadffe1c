"""The mock node's Ollama native API: `POST /api/chat`, `POST /api/generate`, `POST /api/embed`
(`GET /api/tags` is in lb.testing.mock), on every MockNode, as a real Ollama serves both `/v1`
and `/api`.

Wire format as Ollama's API documents it (and as the official `ollama` client parses it):
streams unless the body says `"stream": false`; a stream is NDJSON (`application/x-ndjson`),
one object per line, `{"model", "created_at", "message": {"role", "content"}, "done": false}`
(`/api/generate`: `"response"` in place of `"message"`), then a last line with `"done": true`,
`done_reason` (`stop`, or `length` when `options.num_predict` cut the answer), durations in
nanoseconds, `prompt_eval_count` (words of the prompt) and `eval_count` (tokens answered). A
non-stream answer is that last line with the whole text. Errors are `{"error": "..."}` with the
status (404 `model 'x' not found`; 400 for a body Ollama's Go types would refuse: a content
that is not a string, images that are not base64, tool call arguments that are not an object).
An empty `messages` (or no `prompt`) loads the model: `done_reason: "load"`, no text.

Test knobs (request headers):
- `x-mock-tool-calls: N` — when the request offers `tools` and its last message is the user's,
  the node calls the first N tools (default 1; 0 answers text) instead of answering text, with
  arguments made from each tool's parameter schema (string: its first enum value or "mock",
  integer 1, number 1.5, boolean true, array [], object {}). Streamed, the calls come whole in
  one line before the last, as Ollama sends them. A tool result as the last message gets text.
- `x-mock-stream-error: N` — a stream sends N lines, then `{"error": "..."}` and ends (status
  200 already sent), as Ollama does when the runner fails mid-answer.
- the fault spec (lb.testing.faults) as for the OpenAI endpoints: `status` answers an Ollama
  error body, `drop-after=N` closes the connection after N lines, `drop-after-done` after the
  last line, `ttft-ms`/`itl-ms`/`tokens`/`hang` as usual.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import trio

from lb.errors import BadRequest, LBError, NotFound
from lb.http.routes import Router
from lb.http.types import Request, Response
from lb.testing.embeddings import embed, words
from lb.testing.mock import (
    _GENERATE,
    MAX_EMBEDDING_DIM,
    _answer_text,
    _chat_prompt_bytes,
    _generate_delay,
    _is_int,
    _json_body,
    _Knobs,
    _token_text,
    frames_writer,
)
from lb.testing.tools import example

if TYPE_CHECKING:
    from lb.testing.mock import MockNode

__all__ = ["NDJSON_HEADERS", "add_routes", "chat", "embed_endpoint", "error_body", "generate"]

NDJSON_HEADERS = [(b"content-type", b"application/x-ndjson")]
ROLES = frozenset({"system", "user", "assistant", "tool"})
_NS_PER_TOKEN = 10_000_000  # the durations the mock reports, in nanoseconds


def add_routes(router: Router, node: MockNode) -> None:
    for path, endpoint in (("/api/chat", chat), ("/api/generate", generate),
                           ("/api/embed", embed_endpoint)):
        router.add("POST", path, node._api(functools.partial(endpoint, node), _GENERATE,
                                           render=error_body))


def error_body(error: LBError) -> bytes:
    """Ollama's error shape: `{"error": "<message>"}`."""
    return orjson.dumps({"error": error.message})


# -- request checks: what Ollama's Go types refuse ---------------------------------------------


def _model(node: MockNode, body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required")
    if model not in node.models:
        raise NotFound(f"model '{model}' not found")
    return model


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise BadRequest("json: cannot unmarshal into Go struct field .stream of type bool")
    return stream


def _images(images: Any) -> None:
    if images is None:
        return
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest("json: cannot unmarshal into Go struct field .images of type string")
    for image in images:
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("illegal base64 data in images") from None


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise BadRequest("json: cannot unmarshal into Go struct field .messages of type []Message")
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("json: cannot unmarshal into Go value of type api.Message")
        if message.get("role") not in ROLES:
            raise BadRequest(f"invalid role: {message.get('role')!r}")
        if not isinstance(message.get("content", ""), str):
            raise BadRequest(
                "json: cannot unmarshal array into Go struct field Message.messages.content "
                "of type string"
            )
        _images(message.get("images"))
        calls = message.get("tool_calls")
        if calls is None:
            continue
        for call in calls if isinstance(calls, list) else [None]:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise BadRequest("invalid tool call: no function name")
            if not isinstance(function.get("arguments", {}), dict):
                raise BadRequest(
                    "json: cannot unmarshal string into Go struct field "
                    "ToolCallFunction.messages.tool_calls.function.arguments of type "
                    "api.ToolCallFunctionArguments"
                )
    return messages


def _limit(body: dict[str, Any], tokens: int) -> tuple[int, str]:
    """Tokens to answer and the done_reason: `options.num_predict` shorter than the answer
    cuts it (negative values mean no limit, as in Ollama)."""
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("json: cannot unmarshal into Go struct field .options of type map")
    limit = (options or {}).get("num_predict")
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < tokens:
        return limit, "length"
    return tokens, "stop"


def _header_int(request: Request, name: bytes, default: int | None) -> int | None:
    raw = request.header(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name.decode()} must be an integer") from None
    if value < 0:
        raise BadRequest(f"{name.decode()} must be 0 or more")
    return value


# -- tool calls -------------------------------------------------------------------------------


def _tool_calls(
    request: Request, tools: Any, messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    if not isinstance(tools, list) or not tools or not messages:
        return []
    if messages[-1].get("role") != "user":
        return []
    count = _header_int(request, b"x-mock-tool-calls", 1) or 0
    calls = []
    for index, tool in enumerate(tools[:count]):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest("invalid tool: no function name")
        arguments = example(function.get("parameters"))
        calls.append({"function": {"index": index, "name": function["name"],
                                   "arguments": arguments}})
    return calls


# -- endpoints --------------------------------------------------------------------------------


def _now() -> str:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")


def _stats(prompt_tokens: int, n: int) -> dict[str, Any]:
    return {
        "total_duration": (n + 1) * _NS_PER_TOKEN,
        "load_duration": 1_000_000,
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": _NS_PER_TOKEN,
        "eval_count": n,
        "eval_duration": n * _NS_PER_TOKEN,
    }


def _loaded(model: str, chat: bool) -> Response:
    answer: dict[str, Any] = {"model": model, "created_at": _now()}
    if chat:
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    return Response.json({**answer, "done_reason": "load", "done": True})


async def chat(node: MockNode, request: Request, knobs: _Knobs) -> Response:
    body = _json_body(request)
    model = _model(node, body)
    messages = _check_messages(body.get("messages"))
    stream = _stream(body)
    if not messages:
        return _loaded(model, chat=True)
    calls = _tool_calls(request, body.get("tools"), messages)
    n, reason = _limit(body, knobs.tokens)
    if calls:
        n = len(calls)  # "tokens" of a tool call answer, for eval_count
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
    knobs, on_done = node._timed(
        knobs, _chat_prompt_bytes(messages) if node.prefix_cache else None
    )
    created = _now()

    def line(content: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return {"model": model, "created_at": created, "message": message}

    last = {"done_reason": reason, "done": True, **_stats(prompt_tokens, n)}
    if not stream:
        await _generate_delay(knobs, n)
        if on_done is not None:
            on_done()
        text = "" if calls else _answer_text(n)
        return Response.json({**line(text, calls), **last})
    frames = (
        [orjson.dumps({**line("", calls), "done": False})] if calls
        else [orjson.dumps({**line(_token_text(i)), "done": False}) for i in range(n)]
    )
    frames.append(orjson.dumps({**line(""), **last}))
    return _ndjson(request, frames, knobs, on_done)


async def generate(node: MockNode, request: Request, knobs: _Knobs) -> Response:
    body = _json_body(request)
    model = _model(node, body)
    stream = _stream(body)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest("json: cannot unmarshal into Go struct field .prompt of type string")
    _images(body.get("images"))
    if not prompt:
        return _loaded(model, chat=False)
    n, reason = _limit(body, knobs.tokens)
    knobs, on_done = node._timed(knobs, prompt.encode() if node.prefix_cache else None)
    created = _now()
    head = {"model": model, "created_at": created}
    last = {"done": True, "done_reason": reason, "context": [1, 2, 3],
            **_stats(len(prompt.split()), n)}
    if not stream:
        await _generate_delay(knobs, n)
        if on_done is not None:
            on_done()
        return Response.json({**head, "response": _answer_text(n), **last})
    frames = [orjson.dumps({**head, "response": _token_text(i), "done": False})
              for i in range(n)]
    frames.append(orjson.dumps({**head, "response": "", **last}))
    return _ndjson(request, frames, knobs, on_done)


async def embed_endpoint(node: MockNode, request: Request, knobs: _Knobs) -> Response:
    body = _json_body(request)
    model = _model(node, body)
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest("invalid input type")
    dim = body.get("dimensions") or node.embedding_dim
    if not _is_int(dim) or not 1 <= dim <= MAX_EMBEDDING_DIM:
        raise BadRequest(f"dimensions must be an integer from 1 to {MAX_EMBEDDING_DIM}")
    knobs, _ = node._timed(knobs, None)
    if knobs.ttft:
        await trio.sleep(knobs.ttft)
    prompt_tokens = sum(len(words(t)) for t in texts)
    return Response.json({
        "model": model,
        "embeddings": [embed(t, dim) for t in texts],
        "total_duration": _NS_PER_TOKEN,
        "load_duration": 1_000_000,
        "prompt_eval_count": prompt_tokens,
    })


def _ndjson(
    request: Request, frames: list[bytes], knobs: _Knobs, on_done: Callable[[], None] | None
) -> Response:
    """An NDJSON answer, one line per frame; TTFT before the first, ITL before each other,
    `drop-after`, `drop-after-done` and `x-mock-stream-error` as the module says."""
    lines = [frame + b"\n" for frame in frames]
    error_after = _header_int(request, b"x-mock-stream-error", None)
    cut = False
    if error_after is not None and error_after < len(lines):
        lines = [*lines[:error_after],
                 orjson.dumps({"error": f"mock stream error after {error_after} lines"}) + b"\n"]
        cut = True
    write = frames_writer(lines, knobs, lambda i, _: i > 0, on_done, cut=cut)
    return Response(200, list(NDJSON_HEADERS), stream=write)
