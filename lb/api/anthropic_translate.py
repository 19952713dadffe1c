"""The Anthropic Messages dialect <-> OpenAI chat, for clients of `POST /v1/messages`: pure
functions and one incremental stream translator, no I/O.

Dispatch speaks OpenAI chat to every node, so the `/v1/messages` edge turns the client's
request into an OpenAI chat body (`messages_to_chat`) and the OpenAI answer coming back into
Anthropic's: a whole message (`chat_to_message`), an event stream (`ChatToMessagesStream`,
fed the OpenAI SSE bytes split anywhere), or an error (`error_payload`, `error_event`).

Choices made where the two dialects differ (the README lists them for users):
- `thinking`, `cache_control`, `service_tier`, `container`, `mcp_servers` and other
  Anthropic-only fields are dropped: an OpenAI node has nothing to do with them. A node's
  `reasoning_content` deltas are dropped too (an Anthropic thinking block needs a signature).
- `top_k` passes through (vLLM, llama.cpp and Ollama accept it).
- A tool call whose arguments are not a JSON object becomes `input: {"_raw_arguments": text}`
  in a whole message, so nothing the model said is lost; a stream passes the text through.
- The answer carries the model name the client asked for (the node's is in the
  `x-selected-model` header).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from lb.errors import BadRequest, LBError

MessageBody = dict[str, Any]

# -- errors --------------------------------------------------------------------------------------

# Anthropic's error `type` for each status lb or a node answers. 402 is billing_error and 408/504
# timeout_error (both in the SDK's ErrorType); 413 and 415 are the client's request, so
# invalid_request_error; 503 is lb's "no node can take it now", which is what Anthropic's
# overloaded_error (529) says. Anything else >= 500 is api_error.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_payload(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def lb_error_payload(error: LBError) -> dict[str, Any]:
    return error_payload(error.status, error.message)


def sse(event_type: str, payload: Any) -> bytes:
    """One Anthropic SSE event: `event: <type>` then its JSON."""
    return b"event: " + event_type.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def error_event(error: LBError) -> bytes:
    """The `event: error` that ends a stream whose head already went out."""
    return sse("error", lb_error_payload(error))


def node_error_message(body: bytes) -> str:
    """The message of a node's OpenAI-style error answer (or its text, shortened)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace").strip() or "The node answered an error"
    if isinstance(data, dict):
        error = data.get("error", data.get("detail"))
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return "The node answered an error"


# -- request: Anthropic Messages -> OpenAI chat --------------------------------------------------

_ROLES = ("user", "assistant")


def _bad(message: str, param: str) -> BadRequest:
    return BadRequest(message, code="invalid_request", param=param)


def validate_request(body: MessageBody) -> None:
    """The fields Anthropic requires: model, max_tokens, messages (400 in Anthropic's words)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: field required (a non-empty string)", "model")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _bad("max_tokens: field required", "max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _bad("max_tokens: must be an integer >= 1", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: field required (a non-empty array)", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _bad(f"messages.{i}.role: must be 'user' or 'assistant'", f"messages.{i}")
        content = message.get("content")
        if not isinstance(content, str | list):
            raise _bad(f"messages.{i}.content: must be a string or an array of blocks",
                       f"messages.{i}.content")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream: must be true or false", "stream")


def messages_to_chat(body: MessageBody) -> dict[str, Any]:
    """The OpenAI chat body for a (validated) Anthropic Messages request."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _system_text(system)})
    for i, message in enumerate(body["messages"]):
        if message["role"] == "user":
            messages += _user_messages(message["content"], i)
        else:
            messages.append(_assistant_message(message["content"], i))
    chat: dict[str, Any] = {"model": body["model"], "messages": messages,
                            "max_tokens": body["max_tokens"]}
    for name in ("temperature", "top_p", "top_k", "strategy"):  # `strategy` is lb's own
        if body.get(name) is not None:
            chat[name] = body[name]
    stop = body.get("stop_sequences")
    if stop:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop_sequences: must be an array of strings", "stop_sequences")
        chat["stop"] = stop
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    tools = body.get("tools")
    if tools:
        chat["tools"] = _tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        _tool_choice(choice, chat)
    if body.get("stream") is True:
        chat["stream"] = True
        # Anthropic's last events carry usage; OpenAI nodes send it only when asked.
        chat["stream_options"] = {"include_usage": True}
    return chat


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        texts = [block.get("text") for block in system if isinstance(block, dict)]
        if all(isinstance(text, str) for text in texts) and len(texts) == len(system):
            return "\n".join(texts)  # type: ignore[arg-type]  # checked just above
    raise _bad("system: must be a string or an array of text blocks", "system")


def _blocks(content: str | list[Any], param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad(f"{param}.{j}: a content block must be an object with a 'type'",
                       f"{param}.{j}")
    return content


def _text(block: dict[str, Any], param: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _bad(f"{param}.text: must be a string", param)
    return text


def _image_part(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "base64" and isinstance(source.get("data"), str):
            media = source.get("media_type") or "image/png"
            url = f"data:{media};base64,{source['data']}"
            return {"type": "image_url", "image_url": {"url": url}}
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise _bad(f"{param}.source: an image source must be base64 data or a url", param)


def _user_part(block: dict[str, Any], param: str) -> dict[str, Any] | None:
    kind = block["type"]
    if kind == "text":
        return {"type": "text", "text": _text(block, param)}
    if kind == "image":
        return _image_part(block, param)
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text":
            return {"type": "text", "text": str(source.get("data", ""))}
        raise _bad(f"{param}: only plain-text documents can be translated for this node", param)
    if kind in ("thinking", "redacted_thinking"):
        return None
    raise _bad(f"{param}: content block type {kind!r} is not supported by lb's translation",
               param)


def _user_messages(content: str | list[Any], i: int) -> list[dict[str, Any]]:
    """A user turn: its tool results first (OpenAI wants them right after the assistant's
    tool calls), then what the user said, images of tool results included."""
    param = f"messages.{i}.content"
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, param)):
        if block["type"] == "tool_result":
            tool, images = _tool_result(block, f"{param}.{j}")
            out.append(tool)
            parts += images
        else:
            part = _user_part(block, f"{param}.{j}")
            if part is not None:
                parts.append(part)
    if parts:
        if len(parts) == 1 and parts[0]["type"] == "text":
            out.append({"role": "user", "content": parts[0]["text"]})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _tool_result(
    block: dict[str, Any], param: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tool_id = block.get("tool_use_id")
    if not isinstance(tool_id, str):
        raise _bad(f"{param}.tool_use_id: must be a string", param)
    content = block.get("content", "")
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for k, part in enumerate(_blocks(content, f"{param}.content")):
            if part["type"] == "image":
                images.append(_image_part(part, f"{param}.content.{k}"))
            else:
                texts.append(_text(part, f"{param}.content.{k}"))
        text = "\n".join(texts)
    else:
        raise _bad(f"{param}.content: must be a string or an array of blocks", param)
    if block.get("is_error") is True:  # OpenAI has no such flag: the model reads it instead
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": tool_id, "content": text}, images


def _assistant_message(content: str | list[Any], i: int) -> dict[str, Any]:
    param = f"messages.{i}.content"
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, param)):
        kind = block["type"]
        if kind == "text":
            texts.append(_text(block, f"{param}.{j}"))
        elif kind == "tool_use":
            name, tool_id = block.get("name"), block.get("id")
            if not isinstance(name, str) or not isinstance(tool_id, str):
                raise _bad(f"{param}.{j}: tool_use needs a string 'id' and 'name'",
                           f"{param}.{j}")
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append({"id": tool_id, "type": "function",
                          "function": {"name": name, "arguments": arguments}})
        elif kind not in ("thinking", "redacted_thinking"):
            raise _bad(f"{param}.{j}: content block type {kind!r} is not supported in an "
                       "assistant turn by lb's translation", f"{param}.{j}")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("tools: must be an array", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise _bad(f"tools.{i}: a tool needs a string 'name'", f"tools.{i}")
        if tool.get("type", "custom") != "custom":
            raise _bad(f"tools.{i}: server tool {tool['type']!r} is not supported by lb's "
                       "translation (only custom tools with an input_schema)", f"tools.{i}")
        function: dict[str, Any] = {
            "name": tool["name"],
            "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
        }
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _bad("tool_choice: type must be auto, any, tool (with a name) or none",
                   "tool_choice")
    if choice.get("disable_parallel_tool_use") is True and "tools" in chat:
        chat["parallel_tool_calls"] = False


def estimate_tokens(body: MessageBody) -> int:
    """A cheap estimate of a request's input tokens: about 4 bytes of JSON per token. No
    tokenizer: the real count depends on the node's model, which lb does not load."""
    counted = {key: body.get(key) for key in ("system", "messages", "tools")}
    return max(1, len(orjson.dumps(counted)) // 4)


# -- answer: OpenAI chat.completion -> Anthropic message -----------------------------------------

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(
    finish: Any, matched: Any, stop_sequences: Sequence[str]
) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence). `matched` is the stop string when the node
    says which one it hit (vLLM's `stop_reason`); otherwise a stop is an end_turn."""
    if finish == "stop" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return _STOP_REASONS.get(finish, "end_turn") if finish else "end_turn", None


def usage(openai_usage: Any) -> dict[str, int]:
    """Anthropic's usage for an OpenAI usage object; cached prompt tokens are cache reads
    (Anthropic's input_tokens does not count them)."""
    if not isinstance(openai_usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    prompt = _int(openai_usage.get("prompt_tokens"))
    details = openai_usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    out = {"input_tokens": max(prompt - cached, 0),
           "output_tokens": _int(openai_usage.get("completion_tokens"))}
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as Anthropic's `input` object (see the module's note)."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        parsed = None
    return parsed if isinstance(parsed, dict) else {"_raw_arguments": str(arguments)}


def chat_to_message(
    answer: Any, model: str, msg_id: str, stop_sequences: Sequence[str] = ()
) -> dict[str, Any]:
    """The Anthropic message for an OpenAI chat.completion (`msg_id`: lb's, from the request's
    id, as in a stream; the node's own id says nothing to an Anthropic client)."""
    if not isinstance(answer, dict):
        answer = {}
    choices = answer.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        message = {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):  # some servers answer content parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if not text and isinstance(message.get("refusal"), str):
        text = message["refusal"]
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls")
    for n, call in enumerate(calls if isinstance(calls, list) else []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        call_id = call.get("id")
        content.append({
            "type": "tool_use",
            "id": call_id if isinstance(call_id, str) and call_id else f"toolu_{n}",
            "name": str(function.get("name") or ""),
            "input": tool_input(function.get("arguments")),
        })
    reason, sequence = stop_reason(
        choice.get("finish_reason") if isinstance(choice, dict) else None,
        choice.get("stop_reason") if isinstance(choice, dict) else None,
        stop_sequences,
    )
    if reason == "end_turn" and any(block["type"] == "tool_use" for block in content):
        reason = "tool_use"  # some servers say "stop" after a tool call
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(answer.get("usage")),
    }


_PING = sse("ping", {"type": "ping"})


def message_events(message: dict[str, Any]) -> bytes:
    """A whole message as the event stream Anthropic would have sent (for a node that
    answered JSON to a streamed request)."""
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**message["usage"], "output_tokens": 0}}
    out = [sse("message_start", {"type": "message_start", "message": start}), _PING]
    for index, block in enumerate(message["content"]):
        first: dict[str, Any]
        if block["type"] == "text":
            first = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            first = {**block, "input": {}}
            delta = {"type": "input_json_delta",
                     "partial_json": orjson.dumps(block["input"]).decode()}
        out += [
            sse("content_block_start",
                {"type": "content_block_start", "index": index, "content_block": first}),
            sse("content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta}),
            sse("content_block_stop", {"type": "content_block_stop", "index": index}),
        ]
    out += [
        sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"],
                      "stop_sequence": message["stop_sequence"]},
            "usage": message["usage"],
        }),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(out)


# -- stream: OpenAI SSE -> Anthropic events ------------------------------------------------------

class ChatToMessagesStream:
    """Turns an OpenAI chat stream (bytes, split anywhere) into Anthropic's event stream.

    `feed` returns the Anthropic events for the OpenAI events completed so far; the first call
    always returns `message_start` and a `ping`, so the answer's head goes out with it. Text
    deltas go to a text block, each tool call to its own `tool_use` block (its arguments as
    `input_json_delta`s); `[DONE]` (or `close`, if the node ended without it) closes the open
    block and sends `message_delta` (stop reason, usage) and `message_stop`. A node's in-stream
    error event becomes `event: error`, and nothing follows it.
    """

    __slots__ = (
        "_block", "_buffer", "_data", "_done", "_finish", "_id", "_input_tokens", "_matched",
        "_model", "_next_index", "_outputs", "_started", "_stop_sequences", "_tools", "_usage",
    )

    def __init__(
        self, model: str, message_id: str, input_tokens: int = 0,
        stop_sequences: Sequence[str] = (),
    ) -> None:
        self._model = model
        self._id = message_id
        self._input_tokens = input_tokens
        self._stop_sequences = tuple(stop_sequences)
        self._buffer = b""  # the bytes after the last complete line
        self._data: list[bytes] = []  # the current event's data lines
        self._started = False
        self._done = False
        self._block: tuple[str, int] | None = None  # the open block: ("text"|"tool", index)
        self._next_index = 0
        self._tools: dict[int, int] = {}  # OpenAI tool call index -> content block index
        self._finish: Any = None
        self._matched: Any = None
        self._usage: Any = None
        self._outputs = 0  # deltas sent: the output tokens when the node reports no usage

    @property
    def done(self) -> bool:
        """The stream ended (message_stop or an error event went out)."""
        return self._done

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        if not self._started:
            self._started = True
            out.append(self._message_start())
        buffer = self._buffer + data
        # A CR at the very end may be the first half of a CRLF: wait for the next byte.
        end = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
        cut = max(buffer.rfind(b"\n", 0, end), buffer.rfind(b"\r", 0, end)) + 1
        self._buffer = buffer[cut:]
        if cut:
            for line in buffer[:cut].splitlines():
                self._line(line, out)
        return b"".join(out)

    def close(self) -> bytes:
        """The end of the node's stream: the closing events, unless they went out already."""
        out: list[bytes] = []
        if not self._started:
            self._started = True
            out.append(self._message_start())
        if self._buffer:
            self._line(self._buffer, out)
            self._buffer = b""
        self._line(b"", out)
        if not self._done:
            self._end(out)
        return b"".join(out)

    def error(self, error: LBError) -> bytes:
        """The error event that ends the stream (nothing if it has ended already)."""
        if self._done:
            return b""
        self._done = True
        return error_event(error)

    def _message_start(self) -> bytes:
        return sse("message_start", {
            "type": "message_start",
            "message": {
                "id": self._id, "type": "message", "role": "assistant", "model": self._model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": self._input_tokens, "output_tokens": 0},
            },
        }) + _PING

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if not line:  # a blank line ends the event
            if self._data:
                data = b"\n".join(self._data)
                self._data = []
                if not self._done:
                    self._event(data, out)
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        # event:, id:, retry: and comments say nothing an OpenAI chat stream needs

    def _event(self, data: bytes, out: list[bytes]) -> None:
        if data.strip() == b"[DONE]":
            self._end(out)
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return  # not an event of a chat stream: nothing to translate
        if not isinstance(chunk, dict):
            return
        error = chunk.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            self._done = True
            out.append(sse("error", error_payload(502, str(message or "The node failed"))))
            return
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self._block is None or self._block[0] != "text":
                    self._open({"type": "text", "text": ""}, "text", out)
                self._delta({"type": "text_delta", "text": text}, out)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for position, call in enumerate(calls):
                    if isinstance(call, dict):
                        self._tool_delta(call, position, out)
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
            self._matched = choice.get("stop_reason")

    def _tool_delta(self, call: dict[str, Any], position: int, out: list[bytes]) -> None:
        # Servers that send whole calls at once may leave out `index`: their place in the list.
        position = call.get("index", position)
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        index = self._tools.get(position)
        if index is None:  # a new tool call: its own tool_use block
            call_id = call.get("id")
            block = {
                "type": "tool_use",
                "id": call_id if isinstance(call_id, str) and call_id
                else f"toolu_{self._id}_{position}",
                "name": str(function.get("name") or ""),
                "input": {},
            }
            index = self._open(block, "tool", out)
            self._tools[position] = index
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._delta({"type": "input_json_delta", "partial_json": arguments}, out, index)

    def _open(self, block: dict[str, Any], kind: str, out: list[bytes]) -> int:
        self._close_block(out)
        index = self._next_index
        self._next_index += 1
        self._block = (kind, index)
        out.append(sse("content_block_start",
                       {"type": "content_block_start", "index": index, "content_block": block}))
        return index

    def _delta(self, delta: dict[str, Any], out: list[bytes], index: int | None = None) -> None:
        if index is None:
            assert self._block is not None
            index = self._block[1]
        self._outputs += 1
        out.append(sse("content_block_delta",
                       {"type": "content_block_delta", "index": index, "delta": delta}))

    def _close_block(self, out: list[bytes]) -> None:
        if self._block is not None:
            out.append(sse("content_block_stop",
                           {"type": "content_block_stop", "index": self._block[1]}))
            self._block = None

    def _end(self, out: list[bytes]) -> None:
        self._close_block(out)
        self._done = True
        reason, sequence = stop_reason(self._finish, self._matched, self._stop_sequences)
        if reason == "end_turn" and self._tools:
            reason = "tool_use"
        if self._usage is not None:
            counted = usage(self._usage)
        else:
            counted = {"input_tokens": self._input_tokens, "output_tokens": self._outputs}
        out.append(sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": counted,
        }))
        out.append(sse("message_stop", {"type": "message_stop"}))
