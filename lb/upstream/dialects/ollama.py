"""Ollama's native API (`/api/chat`, `/api/generate`, `/api/embed`, `/api/tags`), spoken in
OpenAI's terms: requests are encoded, answers decoded, NDJSON streams translated to OpenAI SSE.

Pure: no I/O. Why not only Ollama's own `/v1`: the native API takes `options` (`num_ctx`,
`repeat_penalty`, ...), `keep_alive` and `think`, and reports exact token counts in every
answer, streamed or not. A client may send those Ollama-only fields next to the OpenAI ones
(`options` is merged over what the OpenAI parameters set); they are never dropped.

Mapping (OpenAI -> Ollama):
- messages: `developer` -> `system`; text parts joined by newlines; `image_url` data URLs ->
  the message's base64 `images` (Ollama takes nothing else: an http URL is a 400); assistant
  `tool_calls` with their JSON-string arguments -> objects; a `tool` message's `tool_call_id`
  -> `tool_name` (the name of the call it answers).
- temperature, top_p, top_k, seed, stop, presence/frequency penalty -> `options`;
  `max_completion_tokens` (else `max_tokens`) -> `options.num_predict`.
- `response_format` json_object -> `format: "json"`, json_schema -> `format: <the schema>`.
- `tool_choice` "none" sends no tools, "auto" is Ollama's only behaviour; a forced choice has
  no Ollama equivalent and counts as an unknown parameter.
- `stream` is always sent (Ollama streams unless told not to); `stream_options` is lb's.
- Anything else is unknown to Ollama: dropped when `drop_params`, else sent on at the top level.

Answers (Ollama -> OpenAI): `done_reason` "length" -> finish_reason "length", a message with
tool calls -> "tool_calls", else "stop"; usage from `prompt_eval_count` / `eval_count`;
`thinking` -> `reasoning_content`; `{"error": "..."}` -> OpenAI's error object, status kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import orjson

from lb.errors import BadRequest, LBError
from lb.http.errors import error_payload
from lb.http.sse import DONE
from lb.http.types import Headers
from lb.routing.resolve import ModelKind
from lb.upstream.dialects.base import StreamFailed, StreamIncomplete, starts_stream

__all__ = ["PATHS", "OllamaDialect", "OllamaStreamTranslator"]

PATHS: dict[ModelKind, str] = {
    "chat": "/api/chat",
    "completion": "/api/generate",
    "embedding": "/api/embed",
}

# OpenAI parameter -> Ollama option, same meaning and units.
_OPTIONS = ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty")
# Fields read here (or by lb itself) rather than passed on as they are.
_CONSUMED = frozenset({
    "model", "messages", "prompt", "input", "stream", "stream_options", "stop", "max_tokens",
    "max_completion_tokens", "response_format", "tools", "tool_choice", "options",
    "encoding_format", "dimensions", *_OPTIONS,
})
# Ollama's own fields a client may send through lb; kept whatever `drop_params` says.
_NATIVE: dict[ModelKind, frozenset[str]] = {
    "chat": frozenset({"keep_alive", "think", "format"}),
    "completion": frozenset({"keep_alive", "think", "format", "suffix", "system", "raw",
                             "images"}),
    "embedding": frozenset({"keep_alive", "truncate"}),
}
_ERROR_CUT = 500  # characters of a node's non-JSON error body quoted back
MAX_LINE = 8 * 1024 * 1024  # an unfinished stream line longer than this is the node's fault


class OllamaDialect:
    """Ollama's native API. `drop_params`: drop the OpenAI parameters Ollama has no use for
    (True), or send them on at the top level of the body (False; Ollama ignores them)."""

    name = "ollama"
    passthrough = False

    def __init__(self, drop_params: bool = True) -> None:
        self.drop_params = drop_params

    def path(self, kind: ModelKind, stream: bool) -> str:
        return PATHS[kind]

    def encode(self, kind: ModelKind, body: Mapping[str, Any], model: str) -> bytes:
        return orjson.dumps(encode_body(kind, body, model, self.drop_params))

    def auth(self, api_key: str) -> Headers:
        # Ollama has no keys of its own; a proxy in front of it may want a bearer token.
        return [(b"authorization", b"Bearer " + api_key.encode())]

    def is_stream(self, status: int, headers: Headers) -> bool:
        return starts_stream(status, headers, b"application/x-ndjson")

    def decode(self, kind: ModelKind, status: int, body: bytes, model: str) -> bytes:
        """Raises ValueError for a 2xx body that is not an Ollama answer of this kind."""
        if not 200 <= status < 300:
            return orjson.dumps(error_payload(decode_error(status, body)))
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("Ollama's answer is not JSON") from None
        if not isinstance(answer, dict):
            raise ValueError("Ollama's answer is not a JSON object")
        if kind == "chat":
            return orjson.dumps(decode_chat(answer, model))
        if kind == "completion":
            return orjson.dumps(decode_generate(answer, model))
        return orjson.dumps(decode_embed(answer, model))

    def translator(
        self, kind: ModelKind, model: str, request: Mapping[str, Any]
    ) -> OllamaStreamTranslator:
        if kind == "embedding":
            raise ValueError("embeddings are never streamed")
        return OllamaStreamTranslator(kind, model, include_usage=_include_usage(request))

    def models(self, payload: Any) -> tuple[str, ...]:
        from lb.cluster.scanner import parse_ollama_tags  # the scanner owns discovery parsing

        return parse_ollama_tags(payload)


# --- encode ------------------------------------------------------------------------------------


def encode_body(
    kind: ModelKind, body: Mapping[str, Any], model: str, drop_params: bool = True
) -> dict[str, Any]:
    """The OpenAI-shaped `body` as an Ollama request body (a dict, for tests to look at)."""
    out: dict[str, Any] = {"model": model}
    if kind == "chat":
        out["messages"] = _messages(body.get("messages"))
        tools = body.get("tools")
        if tools and body.get("tool_choice") != "none":
            out["tools"] = _tools(tools)
    elif kind == "completion":
        out["prompt"] = _prompt(body.get("prompt"))
    else:
        out["input"] = _input(body.get("input"))
        if body.get("dimensions") is not None:
            out["dimensions"] = body["dimensions"]
    if kind != "embedding":
        out["stream"] = body.get("stream") is True
        fmt = _format(body.get("response_format"))
        if fmt is not None:
            out["format"] = fmt
    options = _options(body) if kind != "embedding" else {}
    extra = body.get("options")
    if extra is not None:
        if not isinstance(extra, dict):
            raise BadRequest("'options' must be an object of Ollama options", param="options")
        options.update(extra)
    if options:
        out["options"] = options
    native = _NATIVE[kind]
    for key, value in body.items():
        if key in _CONSUMED or key in out:
            continue
        if key in native or not drop_params:
            out[key] = value
    if not drop_params and body.get("tool_choice") not in (None, "none", "auto"):
        out["tool_choice"] = body["tool_choice"]
    return out


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    options = {key: body[key] for key in _OPTIONS if body.get(key) is not None}
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None:
        options["num_predict"] = limit
    stop = body.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif stop is not None:
        options["stop"] = stop
    return options


def _format(response_format: Any) -> Any:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest(
                "response_format json_schema needs a 'json_schema.schema' object",
                param="response_format",
            )
        return schema
    return None


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be an array", param="messages")
    names: dict[str, str] = {}  # tool call id -> function name, for the tool results
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object", param="messages")
        role = message.get("role")
        if role == "developer":
            role = "system"
        elif role == "function":  # the legacy shape of a tool result
            role = "tool"
        text, images = _content(message.get("content"))
        item: dict[str, Any] = {"role": role, "content": text}
        if images:
            item["images"] = images
        calls = message.get("tool_calls")
        if calls:
            item["tool_calls"] = _tool_calls(calls, names)
        if role == "tool":
            name = names.get(message.get("tool_call_id") or "") or message.get("name")
            if isinstance(name, str):
                item["tool_name"] = name
        out.append(item)
    return out


def _content(content: Any) -> tuple[str, list[str]]:
    """A message's text and base64 images."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRequest("a message's content must be a string or an array of parts",
                         param="messages")
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(_image(part.get("image_url")))
        else:
            raise BadRequest(f"Ollama takes text and image parts only, not {kind!r}",
                             param="messages")
    return "\n".join(texts), images


def _image(spec: Any) -> str:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise BadRequest("an image_url part needs a 'url'", param="messages")
    head, sep, data = url.partition(",")
    if not (url.startswith("data:") and sep and head.endswith(";base64")):
        # Ollama has no way to fetch an image itself; lb does not fetch on its behalf.
        raise BadRequest(
            "Ollama accepts only base64 images: send the image as a data: URL "
            "(data:image/png;base64,...), not a link", param="messages",
        )
    return data


def _tool_calls(calls: Any, names: dict[str, str]) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise BadRequest("'tool_calls' must be an array", param="messages")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest("each tool call needs a function name", param="messages")
        raw = function.get("arguments")
        arguments: Any
        if isinstance(raw, dict):
            arguments = raw
        else:
            try:
                arguments = orjson.loads(raw) if raw else {}
            except (orjson.JSONDecodeError, TypeError):
                arguments = None
            if not isinstance(arguments, dict):
                raise BadRequest(
                    "Ollama takes tool call arguments as a JSON object; these are not one: "
                    f"{str(raw)[:100]!r}", param="messages",
                )
        if isinstance(call.get("id"), str):
            names[call["id"]] = function["name"]
        out.append({"function": {"name": function["name"], "arguments": arguments}})
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array", param="tools")
    out = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            raise BadRequest("each tool must be {'type': 'function', 'function': {...}}",
                             param="tools")
        # `strict` is OpenAI's; Ollama's tool has name, description and parameters.
        out.append({
            "type": "function",
            "function": {k: v for k, v in function.items() if k != "strict"},
        })
    return out


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise BadRequest("Ollama takes one text prompt: a string (or an array of one string)",
                     param="prompt")


def _input(value: Any) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise BadRequest("Ollama embeds text only: 'input' must be a string or an array of strings",
                     param="input")


def _include_usage(request: Mapping[str, Any]) -> bool:
    options = request.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# --- decode ------------------------------------------------------------------------------------


def decode_error(status: int, body: bytes) -> LBError:
    """An Ollama error answer (`{"error": "..."}`, or whatever a proxy in front sent) as an
    LBError with the node's status and message."""
    message: str | None = None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, str):
            message = error
        elif isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        message = text[:_ERROR_CUT] or f"Ollama answered {status} without a message"
    code: str | None = None
    if status == 404 and "not found" in message and "model" in message:
        code = "model_not_found"
    return LBError(message, status=status, code=code or _code(status))


def _code(status: int) -> str | None:
    return {400: "invalid_request", 401: "invalid_api_key", 404: "not_found",
            429: "rate_limited"}.get(status, "upstream_error" if status >= 500 else None)


def _usage(answer: Mapping[str, Any]) -> dict[str, int]:
    prompt = _count(answer.get("prompt_eval_count"))
    completion = _count(answer.get("eval_count"))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _finish(done_reason: Any, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def _new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


def _openai_calls(calls: Any, cid: str, start: int) -> list[dict[str, Any]]:
    """Ollama's tool calls (arguments as objects) as OpenAI's (JSON strings, with ids made
    from the answer's id and the call's position, since Ollama gives none)."""
    if not isinstance(calls, list):
        return []
    out = []
    for i, call in enumerate(calls, start):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        out.append({
            "index": i,
            "id": f"call_{cid.rpartition('-')[2]}_{i}",
            "type": "function",
            "function": {
                "name": str(function.get("name", "")),
                "arguments": arguments if isinstance(arguments, str)
                else orjson.dumps(arguments if arguments is not None else {}).decode(),
            },
        })
    return out


def decode_chat(answer: Mapping[str, Any], model: str) -> dict[str, Any]:
    message = answer.get("message")
    if not isinstance(message, dict):
        raise ValueError("Ollama's chat answer has no 'message'")
    cid = _new_id("chatcmpl")
    calls = _openai_calls(message.get("tool_calls"), cid, 0)
    for call in calls:
        del call["index"]  # only stream deltas carry an index
    content = message.get("content")
    out: dict[str, Any] = {
        "role": "assistant",
        "content": content if isinstance(content, str) and (content or not calls) else None,
    }
    if calls:
        out["tool_calls"] = calls
    thinking = message.get("thinking")
    if isinstance(thinking, str) and thinking:
        out["reasoning_content"] = thinking
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0, "message": out, "logprobs": None,
            "finish_reason": _finish(answer.get("done_reason"), bool(calls)),
        }],
        "usage": _usage(answer),
    }


def decode_generate(answer: Mapping[str, Any], model: str) -> dict[str, Any]:
    text = answer.get("response")
    if not isinstance(text, str):
        raise ValueError("Ollama's generate answer has no 'response'")
    return {
        "id": _new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0, "text": text, "logprobs": None,
            "finish_reason": _finish(answer.get("done_reason"), False),
        }],
        "usage": _usage(answer),
    }


def decode_embed(answer: Mapping[str, Any], model: str) -> dict[str, Any]:
    vectors = answer.get("embeddings")
    if not isinstance(vectors, list):
        raise ValueError("Ollama's embed answer has no 'embeddings'")
    prompt = _count(answer.get("prompt_eval_count"))
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector}
            for i, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


# --- streams -----------------------------------------------------------------------------------


class OllamaStreamTranslator:
    """One Ollama NDJSON answer (`/api/chat` or `/api/generate`) -> OpenAI SSE chunks: one id,
    the assistant role first (chat), content (and `reasoning_content`, tool call) deltas, the
    finish chunk on the `done: true` line; `finish` adds the usage chunk (if asked) and
    `[DONE]`. A line `{"error": ...}` raises `StreamFailed` with Ollama's
    message (the node's fault); so does a line that is not a JSON object. When the same read
    held good lines before it, `feed` returns their events and the next `feed` or `finish`
    raises."""

    __slots__ = ("_buffer", "_calls", "_chat", "_cid", "_done", "_failed", "_head",
                 "_include_usage", "_object", "_started", "_usage", "_usage_head")

    def __init__(
        self, kind: ModelKind, model: str, *, include_usage: bool = False,
        ident: str | None = None, created: int | None = None,
    ) -> None:
        self._chat = kind == "chat"
        self._cid = ident or _new_id("chatcmpl" if self._chat else "cmpl")
        self._object = b"chat.completion.chunk" if self._chat else b"text_completion"
        stamp = str(int(time.time()) if created is None else created).encode()
        self._usage_head = (
            b'data: {"id":' + orjson.dumps(self._cid) + b',"object":"' + self._object
            + b'","created":' + stamp + b',"model":' + orjson.dumps(model) + b',"choices":'
        )
        self._head = self._usage_head + b'[{"index":0,'
        self._include_usage = include_usage
        self._buffer = b""
        self._started = False
        self._done = False
        self._calls = 0  # tool calls sent so far: the next one's index
        self._usage: tuple[int, int] | None = None
        self._failed: StreamFailed | None = None  # an error line read after other lines

    @property
    def usage(self) -> tuple[int, int] | None:
        return self._usage

    def feed(self, data: bytes) -> bytes:
        if self._failed is not None:
            raise self._failed
        buffer = self._buffer + data if self._buffer else data
        end = buffer.rfind(b"\n")
        if end < 0:
            if len(buffer) > MAX_LINE:
                raise StreamFailed(f"Ollama sent a stream line over {MAX_LINE} bytes")
            self._buffer = buffer
            return b""
        self._buffer = buffer[end + 1:]
        out = []
        for line in buffer[:end].split(b"\n"):
            try:
                out.append(self._line(line))
            except StreamFailed as exc:
                if not any(out):
                    raise
                # What came before the error goes out first; the error on the next call.
                self._failed = exc
                self._buffer = b""
                break
        return b"".join(out)

    def finish(self) -> bytes:
        if self._failed is not None:
            raise self._failed
        out = b""
        if self._buffer:  # a last line without its newline, or half a line: the node died
            rest, self._buffer = self._buffer, b""
            try:
                orjson.loads(rest)
            except orjson.JSONDecodeError:
                raise StreamIncomplete("Ollama's stream ended inside a line") from None
            out = self._line(rest)
        if not self._done:
            raise StreamIncomplete("Ollama's stream ended before its 'done: true' line")
        if self._include_usage:
            prompt, completion = self._usage or (0, 0)
            out += self._usage_head + b"[],\"usage\":" + orjson.dumps({
                "prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }) + b"}\n\n"
        return out + DONE

    def _line(self, line: bytes) -> bytes:
        if self._done or not line.strip():
            return b""  # blank lines between objects; nothing counts after the last one
        try:
            part = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise StreamFailed("Ollama sent a stream line that is not JSON") from None
        if not isinstance(part, dict):
            raise StreamFailed("Ollama sent a stream line that is not a JSON object")
        error = part.get("error")
        if error is not None:
            raise StreamFailed(f"Ollama: {error}")
        out = []
        if not self._started:
            self._started = True
            if self._chat:
                out.append(self._head + b'"delta":{"role":"assistant","content":""},'
                           b'"logprobs":null,"finish_reason":null}]}\n\n')
        if self._chat:
            message = part.get("message")
            if isinstance(message, dict):
                out.extend(self._chat_deltas(message))
        else:
            text = part.get("response")
            if isinstance(text, str) and text:
                out.append(self._head + b'"text":' + orjson.dumps(text)
                           + b',"logprobs":null,"finish_reason":null}]}\n\n')
        if part.get("done") is True:
            self._done = True
            self._usage = (_count(part.get("prompt_eval_count")), _count(part.get("eval_count")))
            reason = orjson.dumps(_finish(part.get("done_reason"), self._calls > 0))
            tail = b'"delta":{},' if self._chat else b'"text":"",'
            out.append(self._head + tail + b'"logprobs":null,"finish_reason":' + reason
                       + b"}]}\n\n")
        return b"".join(out)

    def _chat_deltas(self, message: Mapping[str, Any]) -> list[bytes]:
        out = []
        thinking = message.get("thinking")
        if isinstance(thinking, str) and thinking:
            out.append(self._delta({"reasoning_content": thinking}))
        content = message.get("content")
        if isinstance(content, str) and content:
            out.append(self._head + b'"delta":{"content":' + orjson.dumps(content)
                       + b'},"logprobs":null,"finish_reason":null}]}\n\n')
        calls = _openai_calls(message.get("tool_calls"), self._cid, self._calls)
        if calls:
            self._calls += len(calls)
            out.append(self._delta({"tool_calls": calls}))
        return out

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return (self._head + b'"delta":' + orjson.dumps(delta)
                + b',"logprobs":null,"finish_reason":null}]}\n\n')
