"""The mock node's Anthropic dialect (`MockNode(dialect="anthropic")`, `lb mock --dialect
anthropic`): it plays Anthropic's Messages API for lb's Anthropic upstream dialect.

Endpoints: `POST /v1/messages` (JSON, or SSE with Anthropic's event sequence: `message_start`,
`content_block_start`, `ping`, `content_block_delta`..., `content_block_stop`, `message_delta`,
`message_stop`), `POST /v1/messages/count_tokens`, `GET /v1/models` in Anthropic's shape; the
control endpoints as for any mock node. Errors are Anthropic's
`{"type": "error", "error": {"type", "message"}}`, the type following the status (529:
`overloaded_error`, 429: `rate_limit_error`, ...), faults included (`status=529`). The fault
item `error-after=N` ends a stream with an `event: error` (`overloaded_error`) after N events.

Like the real API, a request needs `anthropic-version`, `max_tokens` and `user`/`assistant`
turns (consecutive same-role messages count as one turn; `system` messages, text only, are
accepted as the SDK allows; every `tool_use` answered by a `tool_result` in the next turn,
and no `tool_result` without its `tool_use`); with `api_key` set, `x-api-key`
or `Authorization: Bearer` must carry it (on `/v1/models` too).

The answer is the mock's usual text (`tokens` words, cut by `max_tokens` -> `max_tokens`, or
by a `stop_sequences` entry -> `stop_sequence`). Tool calls, when the request has `tools`
and `tool_choice` is not `none`: `{"type": "tool", "name": X}` calls X, `{"type": "any"}` the
first tool; otherwise the last user turn's text asks with `call <name>` (each tool so named,
in order; one only with `disable_parallel_tool_use`), and the answer is a text block
`Calling <names>.` then the `tool_use` blocks, `stop_reason: tool_use`. The input is an
example of the tool's `input_schema` (strings "lorem" or the first enum value, numbers 1 or
1.5, booleans true), streamed as `input_json_delta` fragments of 7 characters.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from lb.errors import BadRequest, LBError, NotFound, Unauthorized
from lb.http.routes import Router
from lb.http.sse import SSE_HEADERS
from lb.http.types import Request, Response
from lb.testing.mock import (
    _GENERATE,
    _OTHER,
    _PROBE,
    MockNode,
    _generate_delay,
    _json_body,
    _Knobs,
    _message_words,
    _token_text,
    frames_writer,
)
from lb.testing.tools import example
from lb.upstream.dialects.anthropic import ERROR_STATUS, error_type_for_status

JSON_FRAGMENT = 7  # characters per input_json_delta
_CALL = re.compile(r"\bcall\s+([A-Za-z0-9_-]+)")
_MODEL_CREATED_AT = "2025-01-01T00:00:00Z"

# A block of a streamed answer: ("text" | "thinking", pieces) or ("tool_use", id, name, pieces).
StreamBlock = tuple[Any, ...]


def add_routes(node: MockNode, router: Router) -> None:
    """The Anthropic API endpoints of `node` (wrapped by its counting and fault injection)."""
    for method, path, endpoint, kind in (
        ("GET", "/v1/models", _models, _PROBE),
        ("POST", "/v1/messages", _messages, _GENERATE),
        ("POST", "/v1/messages/count_tokens", _count_tokens, _OTHER),
    ):
        router.add(method, path, node._api(functools.partial(endpoint, node), kind,
            render=error_body))


def error_body(exc: LBError) -> bytes:
    """An error in Anthropic's shape: the type is the error's own when it is an Anthropic
    type, else the one its status stands for."""
    kind = exc.type if exc.type in ERROR_STATUS else error_type_for_status(exc.status)
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": exc.message}})


def check_key(node: MockNode, request: Request) -> None:
    """`x-api-key: K`, or `Authorization: Bearer K` (what the anthropic SDK sends since 2.x)."""
    key = node.api_key.encode()
    if request.header(b"x-api-key") != key and request.header(b"authorization") != (
        b"Bearer " + key
    ):
        raise Unauthorized("invalid x-api-key", type="authentication_error")


# -- endpoints -------------------------------------------------------------------------------------


async def _models(node: MockNode, request: Request, knobs: _Knobs) -> Response:
    data = [
        {"type": "model", "id": m, "display_name": m, "created_at": _MODEL_CREATED_AT}
        for m in node.models
    ]
    return Response.json({
        "data": data, "has_more": False,
        "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
    })


async def _count_tokens(node: MockNode, request: Request, knobs: _Knobs) -> Response:
    body = _checked(node, request, count_only=True)
    return Response.json({"input_tokens": input_tokens(body)})


async def _messages(node: MockNode, request: Request, knobs: _Knobs) -> Response:
    body = _checked(node, request)
    model = body["model"]
    calls = tool_calls(body)
    # A trailing assistant message is a prefill: the answer goes on from its words (the mock's
    # tokens are words), so a continued answer is what one node would have streamed whole.
    last = body["messages"][-1]
    start = _message_words(last) if last.get("role") == "assistant" else 0
    pieces = [_token_text(i) for i in range(start, max(start, knobs.tokens))]
    text_pieces, stop_reason, stop_sequence = _cut(
        pieces, body["max_tokens"], body.get("stop_sequences") or ()
    )
    blocks: list[StreamBlock] = []
    if calls:
        blocks.append(("text", [f"Calling {', '.join(name for name, _ in calls)}."]))
        for k, (name, value) in enumerate(calls):
            text = orjson.dumps(value).decode()
            fragments = [text[i:i + JSON_FRAGMENT] for i in range(0, len(text), JSON_FRAGMENT)]
            blocks.append(("tool_use", f"toolu_{node.name}_{k}", name, fragments))
        stop_reason, stop_sequence = "tool_use", None
    else:
        blocks.append(("text", text_pieces))
    output = sum(len(block[-1]) for block in blocks)
    knobs, on_done = node._timed(
        knobs, _prompt_bytes(body) if node.prefix_cache else None
    )
    head = {
        "id": f"msg_{node.name}_{next(node._ids)}", "type": "message", "role": "assistant",
        "model": model,
    }
    usage = {
        "input_tokens": input_tokens(body), "output_tokens": output,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
    }
    if body.get("stream") is True:
        return _stream(head, blocks, stop_reason, stop_sequence, usage, knobs, on_done)
    await _generate_delay(knobs, len(text_pieces))
    if on_done is not None:
        on_done()
    return Response.json(message_json(head, blocks, stop_reason, stop_sequence, usage))


# -- validation, as Anthropic does it ----------------------------------------------------------


def _checked(node: MockNode, request: Request, count_only: bool = False) -> dict[str, Any]:
    if request.header(b"anthropic-version") is None:
        raise BadRequest("anthropic-version: header is required")
    body = _json_body(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Field required")
    if model not in node.models:
        raise NotFound(f"model: {model}", type="not_found_error")
    if not count_only:
        limit = body.get("max_tokens")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise BadRequest("max_tokens: Field required (a positive integer)")
        stops = body.get("stop_sequences")
        if stops is not None and not (
            isinstance(stops, list) and all(isinstance(s, str) and s.strip() for s in stops)
        ):
            raise BadRequest("stop_sequences: each must be a string with non-whitespace")
        temperature = body.get("temperature")
        if temperature is not None and not (
            isinstance(temperature, int | float) and 0 <= temperature <= 1
        ):
            raise BadRequest("temperature: Input should be less than or equal to 1")
    system = body.get("system")
    if system is not None and not isinstance(system, str) and not (
        isinstance(system, list) and all(_is_text(b) for b in system)
    ):
        raise BadRequest("system: Input should be a string or a list of text blocks")
    _check_messages(body.get("messages"))
    _check_tools(body)
    return body


def _is_text(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "text" and isinstance(
        block.get("text"), str
    )


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise BadRequest(f"{where}.content: Input should be a string or a list of blocks")
    return content


def _check_messages(messages: Any) -> None:
    """Anthropic's rules: roles user or assistant (or system, text only, as the SDK allows);
    consecutive same-role messages are one turn; non-empty content but for a final
    assistant; every `tool_use` answered by a `tool_result` in the next turn, none without."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: at least one message is required")
    turns: list[tuple[str, list[dict[str, Any]], str]] = []  # role, blocks, where
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise BadRequest(f"{where}: Input should be an object")
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            raise BadRequest(f'{where}.role: Input should be "user", "assistant" or "system";'
                f" got {role!r}")
        blocks = _blocks(message.get("content"), where)
        if not blocks and not (role == "assistant" and i == len(messages) - 1):
            raise BadRequest(f"{where}: all messages must have non-empty content except "
                "for the optional final assistant message")
        for j, block in enumerate(blocks):
            kind = block.get("type")
            if kind == "text" and (not isinstance(block.get("text"), str) or not block["text"]):
                raise BadRequest(f"{where}.content.{j}.text: text content blocks must be "
                    "non-empty")
            if role == "system" and kind != "text":
                raise BadRequest(f"{where}.content.{j}: system messages hold text only")
            if kind == "tool_use" and (
                role != "assistant" or not isinstance(block.get("input"), dict)
            ):
                raise BadRequest(f"{where}.content.{j}: tool_use needs an object input in an "
                    "assistant turn")
            if kind == "tool_result" and role != "user":
                raise BadRequest(f"{where}.content.{j}: tool_result belongs in a user turn")
            if kind not in ("text", "image", "document", "thinking", "redacted_thinking",
                    "tool_use", "tool_result"):
                raise BadRequest(f"{where}.content.{j}.type: unknown block type {kind!r}")
        if role == "system":
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, list(blocks), where))
    pending: set[str] = set()  # tool_use ids the next turn must answer
    for role, blocks, where in turns:
        if role == "user":
            answered = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
            if answered - pending:
                raise BadRequest(f"{where}: unexpected `tool_use_id` found in `tool_result` "
                    "blocks: each must answer a `tool_use` block of the previous message")
            if pending - answered:
                raise BadRequest(f"{where}: `tool_use` ids were found without `tool_result` "
                    f"blocks immediately after: {', '.join(sorted(pending - answered))}")
        pending = {
            b["id"] for b in blocks if b.get("type") == "tool_use"
        } if role == "assistant" else set()


def _check_tools(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str)
        and isinstance(t.get("input_schema"), dict) for t in tools
    )):
        raise BadRequest("tools: each tool needs a name and an input_schema object")
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in (
            "auto", "any", "tool", "none"
        ):
            raise BadRequest("tool_choice: type must be auto, any, tool or none")
        if choice["type"] == "tool" and choice.get("name") not in {
            t["name"] for t in tools or ()
        }:
            raise BadRequest("tool_choice.name: no tool of that name")


# -- the answer (pure) -------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict):
                if isinstance(block.get("text"), str):
                    parts.append(block["text"])
                elif block.get("type") == "tool_result":
                    parts.append(_text_of(block.get("content")))
        return " ".join(parts)
    return ""


def input_tokens(body: dict[str, Any]) -> int:
    """Words of the system prompt and every message's text (tool results included)."""
    words = len(_text_of(body.get("system")).split())
    return words + sum(len(_text_of(m.get("content")).split()) for m in body["messages"])


def _prompt_bytes(body: dict[str, Any]) -> bytes:
    return "".join(
        f"{m['role']}\n{_text_of(m.get('content'))}\n" for m in body["messages"]
    ).encode()


def tool_calls(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (name, input) of each tool the answer calls (see the module docstring)."""
    tools = {t["name"]: t for t in body.get("tools") or ()}
    choice = body.get("tool_choice") or {"type": "auto"}
    if not tools or choice["type"] == "none":
        return []
    if choice["type"] == "tool":
        names = [choice["name"]]
    elif choice["type"] == "any":
        names = [next(iter(tools))]
    else:
        last = body["messages"][-1]
        text = _text_of(last.get("content")) if last["role"] == "user" else ""
        names = list(dict.fromkeys(n for n in _CALL.findall(text) if n in tools))
    if choice.get("disable_parallel_tool_use"):
        names = names[:1]
    return [(name, example(tools[name]["input_schema"])) for name in names]


def _cut(
    pieces: list[str], limit: int, stops: Sequence[str]
) -> tuple[list[str], str, str | None]:
    """The pieces of the answer, cut by `max_tokens` (one piece per token) or at the first
    stop sequence (which is not sent); the stop reason and the sequence that stopped it."""
    reason, sequence = "end_turn", None
    if limit < len(pieces):
        pieces, reason = pieces[:limit], "max_tokens"
    text = "".join(pieces)
    found = [(text.find(s), s) for s in stops if s in text]
    if not found:
        return pieces, reason, sequence
    at, sequence = min(found)
    out: list[str] = []
    length = 0
    for piece in pieces:
        if length + len(piece) >= at:
            if at > length:
                out.append(piece[: at - length])
            break
        out.append(piece)
        length += len(piece)
    return out, "stop_sequence", sequence


def message_json(
    head: dict[str, Any], blocks: Sequence[StreamBlock], stop_reason: str | None,
    stop_sequence: str | None, usage: dict[str, int],
) -> dict[str, Any]:
    """The non-stream answer: the blocks whole."""
    content: list[dict[str, Any]] = []
    for block in blocks:
        if block[0] == "tool_use":
            content.append({
                "type": "tool_use", "id": block[1], "name": block[2],
                "input": orjson.loads("".join(block[3]) or "{}"),
            })
        elif block[0] == "thinking":
            content.append({"type": "thinking", "thinking": "".join(block[1]),
                "signature": "mock"})
        else:
            content.append({"type": "text", "text": "".join(block[1])})
    return {
        **head, "content": content, "stop_reason": stop_reason,
        "stop_sequence": stop_sequence, "usage": usage,
    }


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def stream_events(
    head: dict[str, Any], blocks: Sequence[StreamBlock], stop_reason: str | None,
    stop_sequence: str | None, usage: dict[str, int],
) -> list[bytes]:
    """The SSE events of a streamed answer, in Anthropic's order, one delta per piece."""
    start_usage = {**usage, "output_tokens": 1}
    events = [_event("message_start", {"type": "message_start", "message": {
        **head, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": start_usage,
    }})]
    for index, block in enumerate(blocks):
        kind = block[0]
        if kind == "tool_use":
            start: dict[str, Any] = {"type": "tool_use", "id": block[1], "name": block[2],
                "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in block[3]]
        elif kind == "thinking":
            start = {"type": "thinking", "thinking": ""}
            deltas = [{"type": "thinking_delta", "thinking": p} for p in block[1]]
            deltas.append({"type": "signature_delta", "signature": "mock"})
        else:
            start = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in block[1]]
        events.append(_event("content_block_start", {
            "type": "content_block_start", "index": index, "content_block": start,
        }))
        if index == 0:
            events.append(_event("ping", {"type": "ping"}))
        events.extend(
            _event("content_block_delta", {
                "type": "content_block_delta", "index": index, "delta": delta,
            })
            for delta in deltas
        )
        events.append(_event("content_block_stop", {"type": "content_block_stop",
            "index": index}))
    events.append(_event("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
        "usage": {"output_tokens": usage["output_tokens"]},
    }))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return events


def error_event(kind: str, message: str) -> bytes:
    return _event("error", {"type": "error", "error": {"type": kind, "message": message}})


def split_message(message: dict[str, Any], size: int) -> list[StreamBlock]:
    """A whole Anthropic message's blocks as stream blocks, texts and tool inputs cut into
    `size`-character pieces (for tests that stream a given message)."""

    def cut(text: str) -> list[str]:
        return [text[i:i + size] for i in range(0, len(text), size)]

    blocks: list[StreamBlock] = []
    for block in message["content"]:
        if block["type"] == "tool_use":
            blocks.append(("tool_use", block["id"], block["name"],
                cut(orjson.dumps(block["input"]).decode())))
        elif block["type"] == "thinking":
            blocks.append(("thinking", cut(block["thinking"])))
        else:
            blocks.append(("text", cut(block["text"])))
    return blocks


def _stream(
    head: dict[str, Any], blocks: Sequence[StreamBlock], stop_reason: str | None,
    stop_sequence: str | None, usage: dict[str, int], knobs: _Knobs,
    on_done: Callable[[], None] | None,
) -> Response:
    frames = stream_events(head, blocks, stop_reason, stop_sequence, usage)
    errored = knobs.error_after is not None and knobs.error_after < len(frames)
    if knobs.error_after is not None and errored:
        frames = [*frames[: knobs.error_after],
            error_event("overloaded_error", "Overloaded (mock fault: error-after)")]
    write = frames_writer(
        frames, knobs, lambda i, frame: i > 0 and frame.startswith(b"event: content_block_delta"),
        on_done, cut=errored,
    )
    return Response(200, list(SSE_HEADERS), stream=write)


__all__ = [
    "JSON_FRAGMENT",
    "StreamBlock",
    "add_routes",
    "check_key",
    "error_body",
    "error_event",
    "example",
    "input_tokens",
    "message_json",
    "split_message",
    "stream_events",
    "tool_calls",
]
