"""Anthropic's Messages API as a node dialect: OpenAI chat requests in, Anthropic answers out.

Pure: no I/O, and the only clock read is the `created` stamp of an answer. What does not carry
over, and what was decided:

- Only chat: `/v1/messages`. Embeddings and legacy completions are a `BadRequest` (Anthropic
  has neither; a completions prompt is not mapped to a chat turn, whose answer would not be a
  `text_completion`).
- System (and `developer`) messages, wherever they are, become the top-level `system`, their
  texts joined by a blank line, in order; their position among the turns is lost. A request
  of system messages only sends them as the user turn (Anthropic needs one).
- `temperature` is clamped to Anthropic's 0..1 (OpenAI's goes to 2; above 1 Anthropic answers
  400). `n` > 1 is a `BadRequest`. `top_k` and `thinking` pass through as Anthropic fields.
- OpenAI fields with no Anthropic meaning (`frequency_penalty`, `seed`, `response_format`,
  `logprobs`, ...) are dropped when `drop_params`, else passed through as they are (and the
  provider decides).
- Thinking blocks come back as the message's / delta's `reasoning_content` (the field vLLM,
  DeepSeek and LiteLLM use); signatures and redacted thinking are dropped.
- Errors: the node's status is kept, the body becomes OpenAI's with `code` = Anthropic's error
  type. `authentication_error` and `permission_error` concern lb's credential, not the
  client's: their message says so (`is_node_fault` tells dispatch to blame the node).
- A stream's `error` event raises `StreamError`, a `StreamFailed`: the node failed
  mid-answer (after the events that came before it).
"""

from __future__ import annotations

import binascii
import time
from collections.abc import Mapping
from typing import Any

import orjson

from lb.errors import BadRequest
from lb.http.errors import error_type
from lb.http.sse import DONE
from lb.http.types import Headers
from lb.routing.resolve import ModelKind
from lb.upstream.dialects.base import StreamFailed, StreamIncomplete, starts_stream

__all__ = [
    "ANTHROPIC",
    "ERROR_STATUS",
    "FINISH_REASON",
    "AnthropicDialect",
    "AnthropicStreamTranslator",
    "StreamError",
    "chat_id",
    "decode_error",
    "decode_message",
    "encode_request",
    "error_type_for_status",
    "is_node_fault",
]

# Anthropic's error types and the status each comes with.
ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
_TYPE_BY_STATUS = {status: name for name, status in ERROR_STATUS.items()}

# Anthropic stop_reason -> OpenAI finish_reason.
FINISH_REASON: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# OpenAI fields this dialect translates (everything else: dropped or passed, per drop_params).
_TRANSLATED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "stop", "temperature", "top_p",
    "stream", "stream_options", "user", "tools", "tool_choice", "parallel_tool_calls", "n",
})
# Anthropic's own fields a client may send on purpose: kept whatever drop_params says.
_NATIVE = frozenset({"top_k", "thinking"})
_ERROR_LIMIT = 2000  # characters of a non-JSON error body quoted to the client


def error_type_for_status(status: int) -> str:
    """The Anthropic error type a status stands for (`api_error` for unknown 5xx)."""
    return _TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")


def is_node_fault(status: int) -> bool:
    """Whether an Anthropic error status is the node's (or lb's credential's) fault rather
    than the client's: 401/403 mean lb's key is wrong or lacks access, 429/5xx/529 the
    provider's state. Dispatch should fail over on these and not hand 401 to the client."""
    return status in (401, 403, 429) or status >= 500


class StreamError(StreamFailed):
    """The node sent an `error` event mid-stream (e.g. `overloaded_error`): it failed after
    the answer began. `status` is the one that type comes with (529 for overloaded). When
    the same read held events before it, `feed` returns theirs and the next call raises."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.status = ERROR_STATUS.get(error_type, 500)


class AnthropicDialect:
    name = "anthropic"
    passthrough = False

    def __init__(
        self, default_max_tokens: int = 4096, drop_params: bool = True,
        version: str = "2023-06-01",
    ) -> None:
        self.default_max_tokens = default_max_tokens
        self.drop_params = drop_params
        self.version = version

    def path(self, kind: ModelKind, stream: bool) -> str:
        _check_kind(kind)
        return "/v1/messages"

    def encode(self, kind: ModelKind, body: Mapping[str, Any], model: str) -> bytes:
        _check_kind(kind)
        return orjson.dumps(encode_request(body, model, self.default_max_tokens, self.drop_params))

    def auth(self, api_key: str) -> Headers:
        """`x-api-key` (when there is a key) and `anthropic-version`, which Anthropic requires
        on every request: call this even with an empty key."""
        headers = [(b"anthropic-version", self.version.encode())]
        if api_key:
            headers.append((b"x-api-key", api_key.encode()))
        return headers

    def is_stream(self, status: int, headers: Headers) -> bool:
        return starts_stream(status, headers, b"text/event-stream")

    def decode(self, kind: ModelKind, status: int, body: bytes, model: str) -> bytes:
        """A 2xx Anthropic message -> OpenAI `chat.completion` (ValueError if it is not one:
        the node's fault); an error -> OpenAI's error body, status unchanged."""
        if 200 <= status < 300:
            try:
                message = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"Anthropic answer is not JSON: {exc}") from None
            return orjson.dumps(decode_message(message, model, int(time.time())))
        return orjson.dumps(decode_error(status, body))

    def translator(
        self, kind: ModelKind, model: str, request: Mapping[str, Any]
    ) -> AnthropicStreamTranslator:
        options = request.get("stream_options")
        include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
        return AnthropicStreamTranslator(model, include_usage)

    def models(self, payload: Any) -> tuple[str, ...]:
        """The ids of Anthropic's `GET /v1/models` answer (`{"data": [{"id": ...}], ...}`;
        ask with `?limit=1000`: it is paged, 20 by default)."""
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise ValueError("Anthropic /v1/models answer has no 'data' list")
        return tuple(dict.fromkeys(
            item["id"] for item in data
            if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]
        ))


ANTHROPIC = AnthropicDialect()


def _check_kind(kind: ModelKind) -> None:
    if kind != "chat":
        what = "embeddings" if kind == "embedding" else "legacy completions"
        raise BadRequest(
            f"This model is served by Anthropic, which has no {what} endpoint; "
            "use /v1/chat/completions", code="unsupported_endpoint",
        )


# -- request: OpenAI chat -> Anthropic Messages ------------------------------------------------


def encode_request(
    body: Mapping[str, Any], model: str, default_max_tokens: int = 4096, drop_params: bool = True
) -> dict[str, Any]:
    """The Anthropic Messages body for an OpenAI chat body (`BadRequest` for what Anthropic
    cannot express)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    system, turns = _encode_messages(messages)
    if not turns and system:
        # Only system messages (OpenAI takes that): Anthropic needs a turn, so they are one.
        turns = [{"role": "user", "content": [{"type": "text", "text": "\n\n".join(system)}]}]
        system = []
    out: dict[str, Any] = {"model": model}
    if system:
        out["system"] = "\n\n".join(system)
    out["messages"] = turns

    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is None:
        limit = default_max_tokens
    elif not _is_int(limit) or limit < 1:
        raise BadRequest("'max_tokens' must be a positive integer", param="max_tokens")
    out["max_tokens"] = limit

    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        if not all(isinstance(s, str) for s in stop):
            raise BadRequest("'stop' must be a string or an array of strings", param="stop")
        out["stop_sequences"] = stop
    elif stop is not None and stop != []:
        raise BadRequest("'stop' must be a string or an array of strings", param="stop")

    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature):
            raise BadRequest("'temperature' must be a number", param="temperature")
        out["temperature"] = min(max(temperature, 0), 1)  # Anthropic's range is 0..1
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest("Anthropic models give one choice per request: 'n' must be 1",
            param="n")
    if body.get("stream") is True:
        out["stream"] = True
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}

    tools = body.get("tools")
    if tools:
        out["tools"] = _encode_tools(tools)
        # (without tools Anthropic refuses a tool_choice; OpenAI clients send "none" alone)
        choice = _encode_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice

    for key, value in body.items():
        if key in _TRANSLATED:
            continue
        if key in _NATIVE or not drop_params:
            out[key] = value
    return out


def _encode_messages(messages: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, Anthropic turns): same-role neighbours merged, as Anthropic wants
    alternating turns; tool results first in their user turn, as Anthropic requires."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object", param=f"messages[{i}]")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            text = _system_text(content, i)
            if text:
                system.append(text)
            continue
        if role == "user":
            blocks = _user_blocks(content, i)
            anthropic_role = "user"
        elif role == "assistant":
            blocks = _assistant_blocks(message, i)
            anthropic_role = "assistant"
        elif role == "tool":
            blocks = [_tool_result(message, i)]
            anthropic_role = "user"
        else:
            raise BadRequest(f"unsupported message role {role!r}", param=f"messages[{i}].role")
        if turns and turns[-1]["role"] == anthropic_role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": anthropic_role, "content": blocks})
    for turn in turns:
        if turn["role"] == "user":
            # stable: tool results (in order) before the rest
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    return system, turns


def _system_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise BadRequest("system messages may hold text parts only",
                    param=f"messages[{i}].content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise BadRequest("message content must be a string or an array of parts",
        param=f"messages[{i}].content")


def _user_blocks(content: Any, i: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or an array of parts",
            param=f"messages[{i}].content")
    blocks = []
    for j, part in enumerate(content):
        block = _part(part, f"messages[{i}].content[{j}]")
        if block is not None:
            blocks.append(block)
    return blocks


def _part(part: Any, where: str) -> dict[str, Any] | None:
    """One OpenAI content part as an Anthropic block (None for an empty text); a part's
    `cache_control` (as LiteLLM's clients send it) is kept."""
    block = _block(part, where)
    if block is not None and "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return block


def _block(part: Any, where: str) -> dict[str, Any] | None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]} if part["text"] else None
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise BadRequest("image_url needs a 'url'", param=where)
        return {"type": "image", "source": _source(url, where)}
    if kind == "file":
        file = part.get("file")
        data = file.get("file_data") if isinstance(file, dict) else None
        if not isinstance(data, str):
            raise BadRequest("file parts need 'file_data' (a data: URL) for Anthropic",
                param=where)
        return {"type": "document", "source": _source(data, where)}
    raise BadRequest(f"content part type {kind!r} is not supported by Anthropic", param=where)


def _source(url: str, where: str) -> dict[str, Any]:
    """A data: URL -> a base64 source; an http(s) URL -> a url source."""
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise BadRequest("data URLs must be data:<media type>;base64,<data>", param=where)
        try:
            binascii.a2b_base64(data, strict_mode=True)
        except binascii.Error:
            raise BadRequest("the data URL's data is not valid base64", param=where) from None
        return {"type": "base64", "media_type": media_type, "data": data}
    if url.startswith(("http://", "https://")):
        return {"type": "url", "url": url}
    raise BadRequest("image and file URLs must be http(s) or data: URLs", param=where)


def _assistant_blocks(message: dict[str, Any], i: int) -> list[dict[str, Any]]:
    content = message.get("content")
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "refusal" and isinstance(part.get("refusal"), str):
                part = {"type": "text", "text": part["refusal"]}
            block = _part(part, f"messages[{i}].content[{j}]")
            if block is not None:
                blocks.append(block)
    elif content is not None:
        raise BadRequest("message content must be a string or an array of parts",
            param=f"messages[{i}].content")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise BadRequest("'tool_calls' must be an array", param=f"messages[{i}].tool_calls")
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest("a tool call needs an id and a function name", param=where)
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise BadRequest("a tool call needs an id and a function name", param=where)
        blocks.append({
            "type": "tool_use", "id": call_id, "name": function["name"],
            "input": _arguments(function.get("arguments"), where),
        })
    return blocks


def _arguments(arguments: Any, where: str) -> dict[str, Any]:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            value = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            raise BadRequest("tool call arguments must be a JSON object", param=where) from None
    else:
        value = arguments
    if not isinstance(value, dict):
        raise BadRequest("tool call arguments must be a JSON object", param=where)
    return value


def _tool_result(message: dict[str, Any], i: int) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise BadRequest("a tool message needs 'tool_call_id'",
            param=f"messages[{i}].tool_call_id")
    content = message.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    if isinstance(content, str):
        block["content"] = content
    elif isinstance(content, list):
        block["content"] = _user_blocks(content, i)
    elif content is not None:
        raise BadRequest("message content must be a string or an array of parts",
            param=f"messages[{i}].content")
    return block


def _encode_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array", param="tools")
    out = []
    for j, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (not isinstance(tool, dict) or tool.get("type", "function") != "function"
                or not isinstance(function, dict) or not isinstance(function.get("name"), str)):
            raise BadRequest("only function tools with a name are supported",
                param=f"tools[{j}]")
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        entry: dict[str, Any] = {"name": function["name"], "input_schema": schema}
        if isinstance(function.get("description"), str):
            entry["description"] = function["description"]
        out.append(entry)
    return out


def _encode_tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any]
    if choice is None:
        if parallel is not False:
            return None
        out = {"type": "auto"}
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        out = {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif (isinstance(choice, dict) and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str)):
        out = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise BadRequest("'tool_choice' must be auto, none, required or a named function",
            param="tool_choice")
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- answers: Anthropic -> OpenAI -----------------------------------------------------------------


def chat_id(message_id: str) -> str:
    """The OpenAI id for an Anthropic message id (the same for its JSON and stream forms)."""
    return f"chatcmpl-{message_id}"


def _usage(usage: Any) -> dict[str, Any]:
    """Anthropic usage -> OpenAI's: cached input counts as prompt tokens, as OpenAI counts it."""
    usage = usage if isinstance(usage, dict) else {}
    fresh = _count(usage.get("input_tokens"))
    written = _count(usage.get("cache_creation_input_tokens"))
    read = _count(usage.get("cache_read_input_tokens"))
    prompt = fresh + written + read
    completion = _count(usage.get("output_tokens"))
    out: dict[str, Any] = {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if read:
        out["prompt_tokens_details"] = {"cached_tokens": read}
    return out


def _count(value: Any) -> int:
    return value if _is_int(value) and value >= 0 else 0


def decode_message(message: Any, model: str, created: int) -> dict[str, Any]:
    """An Anthropic message -> an OpenAI chat.completion (ValueError if it is not one)."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        raise ValueError("Anthropic answer has no 'content' list")
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message["content"]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif kind == "tool_use":
            calls.append({
                "id": str(block.get("id", "")), "type": "function",
                "function": {
                    "name": str(block.get("name", "")),
                    "arguments": orjson.dumps(block.get("input") or {}).decode(),
                },
            })
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
    }
    if calls:
        reply["tool_calls"] = calls
    if thinking:
        reply["reasoning_content"] = "".join(thinking)
    stop = message.get("stop_reason")
    return {
        "id": chat_id(str(message.get("id", ""))),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0, "message": reply, "logprobs": None,
            "finish_reason": FINISH_REASON.get(stop, "stop") if isinstance(stop, str) else "stop",
        }],
        "usage": _usage(message.get("usage")),
    }


def decode_error(status: int, body: bytes) -> dict[str, Any]:
    """An Anthropic error answer -> OpenAI's `{"error": {...}}` (`code`: Anthropic's type)."""
    kind: str | None = None
    message: str | None = None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        kind = error.get("type") if isinstance(error.get("type"), str) else None
        message = error.get("message") if isinstance(error.get("message"), str) else None
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        message = text[:_ERROR_LIMIT] or f"HTTP {status} from the Anthropic node"
    if status in (401, 403):
        message = (
            f"The provider refused lb's credential for this node ({kind or status}: {message});"
            " the node's api_key in lb's configuration must be fixed, not the client's key"
        )
    return {"error": {
        "message": message, "type": error_type(status), "param": None,
        "code": kind or error_type_for_status(status),
    }}


# -- streams: Anthropic SSE -> OpenAI SSE ---------------------------------------------------------


class AnthropicStreamTranslator:
    """One Anthropic event stream -> OpenAI chat.completion.chunk events.

    Bytes may be split anywhere: events are cut at blank lines (LF, CRLF or CR line endings),
    only `data:` lines are read (each event's JSON names its own type). Chunks: the role first
    (at `message_start`), then content, tool-call and reasoning deltas, the finish reason (at
    `message_delta`), and from `finish`: a usage chunk when asked, then `[DONE]`."""

    def __init__(self, model: str, include_usage: bool, created: int | None = None) -> None:
        self._model = model
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._buffer = bytearray()
        self._data: list[bytes] = []  # the current event's data lines
        self._head = b""  # `data: {"id":..,"object":..,"created":..,"model":..,"choices":[`
        self._started = False
        self._finished = False  # finish_reason sent
        self._stopped = False  # message_stop seen
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        # Anthropic's usage so far: message_start's, updated by message_delta's (cumulative)
        self._raw_usage: dict[str, Any] | None = None
        self._failed: StreamError | None = None  # an error event read after other events

    @property
    def usage(self) -> tuple[int, int] | None:
        if self._raw_usage is None:
            return None
        usage = _usage(self._raw_usage)
        return usage["prompt_tokens"], usage["completion_tokens"]

    def feed(self, data: bytes) -> bytes:
        if self._failed is not None:
            raise self._failed
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        if b"\r" not in buffer:  # LF only, as Anthropic sends: every whole line at once
            last = buffer.rfind(b"\n")
            if last < 0:
                return b""
            lines = bytes(buffer[:last]).split(b"\n")
            del buffer[: last + 1]
            try:
                for line in lines:
                    self._line(line, out)
            except StreamError as exc:
                buffer.clear()
                return self._fail(exc, out)
            return b"".join(out)
        start = 0
        n = len(buffer)
        while True:
            end = _line_end(buffer, start)
            if end is None:
                break
            line_stop, next_start = end
            if line_stop == n - 1 and buffer[line_stop] == 0x0D:
                break  # a CR at the very end: its LF may be in the next read
            try:
                self._line(bytes(buffer[start:line_stop]), out)
            except StreamError as exc:
                buffer.clear()
                return self._fail(exc, out)
            start = next_start
        del buffer[:start]
        return b"".join(out)

    def finish(self) -> bytes:
        if self._failed is not None:
            raise self._failed
        out: list[bytes] = []
        if self._buffer.endswith(b"\r"):  # held in case an LF followed: it was a line end
            out.append(self.feed(b"\n"))
            if self._failed is not None:
                raise self._failed
        # An event the body ended inside (no blank line after it) is dropped, as SSE says.
        if not self._stopped:
            raise StreamIncomplete("the Anthropic stream ended without message_stop")
        if self._include_usage:
            out.append(self._head_bytes() + b'],"usage":' + orjson.dumps(self._usage_dict())
                + b"}\n\n")
        out.append(DONE)
        return b"".join(out)

    def _fail(self, exc: StreamError, out: list[bytes]) -> bytes:
        """The events before the error go out first; the error is raised on the next call."""
        if not out:
            raise exc
        self._failed = exc
        return b"".join(out)

    # -- parsing

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if not line:
            if self._data:
                self._event(out)
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        # `event:`, `id:`, `retry:` and comments: the data names its own type

    def _event(self, out: list[bytes]) -> None:
        raw = b"\n".join(self._data)
        self._data = []
        if self._stopped:
            return
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise StreamError("api_error", "the Anthropic node sent an event that is not JSON"
                ) from None
        if not isinstance(event, dict):
            raise StreamError("api_error", "the Anthropic node sent an event that is not JSON")
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            message = message if isinstance(message, dict) else {}
            self._start(str(message.get("id", "")), out)
            usage = message.get("usage")
            if isinstance(usage, dict):
                self._raw_usage = dict(usage)
        elif kind == "content_block_start":
            self._start("", out)
            block = event.get("content_block")
            if isinstance(block, dict):
                self._block_start(event.get("index"), block, out)
        elif kind == "content_block_delta":
            self._start("", out)
            delta = event.get("delta")
            if isinstance(delta, dict):
                self._delta(event.get("index"), delta, out)
        elif kind == "message_delta":
            self._start("", out)
            delta = event.get("delta")
            stop = delta.get("stop_reason") if isinstance(delta, dict) else None
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._raw_usage = {**(self._raw_usage or {}), **usage}
            if isinstance(stop, str):
                self._finish_chunk(FINISH_REASON.get(stop, "stop"), out)
        elif kind == "message_stop":
            self._start("", out)
            self._finish_chunk("stop", out)
            self._stopped = True
        elif kind == "error":
            error = event.get("error")
            error = error if isinstance(error, dict) else {}
            raise StreamError(str(error.get("type", "api_error")),
                str(error.get("message", "error event from the Anthropic node")))
        # ping, content_block_stop and event types added later: nothing to say

    def _block_start(self, index: Any, block: dict[str, Any], out: list[bytes]) -> None:
        kind = block.get("type")
        if kind == "tool_use":
            slot = len(self._tools)
            self._tools[index] = slot
            call: dict[str, Any] = {
                "index": slot, "id": str(block.get("id", "")), "type": "function",
                "function": {"name": str(block.get("name", "")), "arguments": ""},
            }
            if block.get("input"):
                call["function"]["arguments"] = orjson.dumps(block["input"]).decode()
            self._chunk({"tool_calls": [call]}, out)
        elif kind == "text" and block.get("text"):
            self._chunk({"content": block["text"]}, out)
        elif kind == "thinking" and block.get("thinking"):
            self._chunk({"reasoning_content": block["thinking"]}, out)

    def _delta(self, index: Any, delta: dict[str, Any], out: list[bytes]) -> None:
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if isinstance(text, str) and text:
                self._chunk({"content": text}, out)
        elif kind == "input_json_delta":
            part = delta.get("partial_json")
            slot = self._tools.get(index)
            if isinstance(part, str) and part and slot is not None:
                self._chunk({"tool_calls": [{"index": slot, "function": {"arguments": part}}]},
                    out)
        elif kind == "thinking_delta":
            text = delta.get("thinking")
            if isinstance(text, str) and text:
                self._chunk({"reasoning_content": text}, out)
        # signature_delta, citations_delta: no OpenAI counterpart

    # -- writing

    def _start(self, message_id: str, out: list[bytes]) -> None:
        """The role chunk, once, before anything else (and the id every chunk carries)."""
        if self._started:
            return
        self._started = True
        self._head = (
            b'data: {"id":' + orjson.dumps(chat_id(message_id))
            + b',"object":"chat.completion.chunk","created":' + str(self._created).encode()
            + b',"model":' + orjson.dumps(self._model) + b',"choices":['
        )
        self._chunk({"role": "assistant", "content": ""}, out)

    def _head_bytes(self) -> bytes:
        if not self._started:
            self._start("", [])
        return self._head

    def _chunk(self, delta: dict[str, Any], out: list[bytes]) -> None:
        out.append(self._head + b'{"index":0,"delta":' + orjson.dumps(delta)
            + b',"logprobs":null,"finish_reason":null}]}\n\n')

    def _finish_chunk(self, reason: str, out: list[bytes]) -> None:
        if self._finished:
            return
        self._finished = True
        out.append(self._head + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + orjson.dumps(reason) + b"}]}\n\n")

    def _usage_dict(self) -> dict[str, Any]:
        return _usage(self._raw_usage)


def _line_end(buffer: bytearray, start: int) -> tuple[int, int] | None:
    """(where the line from `start` stops, where the next begins), or None with no line
    ending in the buffer yet. Endings: LF, CRLF, CR."""
    lf = buffer.find(b"\n", start)
    cr = buffer.find(b"\r", start, lf if lf >= 0 else len(buffer))
    if cr >= 0:
        if cr + 1 < len(buffer) and buffer[cr + 1] == 0x0A:
            return cr, cr + 2
        return cr, cr + 1
    if lf >= 0:
        return lf, lf + 1
    return None
