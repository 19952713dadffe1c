"""The Ollama native dialect: pure translation properties (hypothesis), the answers validated
with the `openai` SDK's own types and the requests with the `ollama` client's, then the dialect
against the mock Ollama API over real sockets."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from ollama import _types as ollama_types  # the request types are not re-exported
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
)

from lb.errors import BadRequest
from lb.routing.resolve import ModelKind
from lb.testing import MockNode
from lb.upstream.dialects.base import Dialect, StreamFailed, StreamIncomplete
from lb.upstream.dialects.ollama import OllamaDialect, OllamaStreamTranslator, encode_body

DIALECT = OllamaDialect()
# No deadline: the machine is shared, and a slow example is not a wrong one.
PURE = settings(deadline=None)
TEXT = st.text(max_size=30)
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), TEXT)
ARGUMENTS = st.dictionaries(st.text(min_size=1, max_size=10), JSON_SCALAR, max_size=4)


def events(sse: bytes) -> list[Any]:
    """The SSE payloads: JSON objects, and the string "[DONE]"."""
    out: list[Any] = []
    for block in sse.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: "), block
        data = block[6:]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def completion_chunk(event: dict[str, Any]) -> Completion:
    """A text completion stream chunk, validated. OpenAI's streams carry `finish_reason: null`
    until the last chunk, which the SDK's `Completion` type (made for whole answers) refuses;
    the SDK parses stream chunks without validation, so only that field is let through."""
    choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in event["choices"]]
    Completion.model_validate({**event, "choices": choices})
    return Completion.model_construct(**event)


def function_calls(message: ChatCompletionMessage) -> list[ChatCompletionMessageFunctionToolCall]:
    calls = message.tool_calls or []
    assert all(isinstance(c, ChatCompletionMessageFunctionToolCall) for c in calls)
    return [c for c in calls if isinstance(c, ChatCompletionMessageFunctionToolCall)]


def ndjson(lines: list[dict[str, Any]], crlf: bool = False) -> bytes:
    end = b"\r\n" if crlf else b"\n"
    return b"".join(orjson.dumps(line) + end for line in lines)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


# --- the protocol ----------------------------------------------------------------------------


def test_is_a_dialect() -> None:
    dialect: Dialect = DIALECT  # mypy checks the protocol; this checks the basics at run time
    assert dialect.name == "ollama" and not dialect.passthrough
    assert [dialect.path(k, False) for k in ("chat", "completion", "embedding")] == [
        "/api/chat", "/api/generate", "/api/embed",
    ]
    assert dialect.auth("k") == [(b"authorization", b"Bearer k")]
    ndjson_head = [(b"content-type", b"application/x-ndjson")]
    assert dialect.is_stream(200, ndjson_head)
    assert not dialect.is_stream(200, [(b"content-type", b"application/json")])
    assert not dialect.is_stream(500, ndjson_head)
    assert dialect.models({"models": [{"name": "llama3:8b"}, {"model": "qwen3"}]}) == (
        "llama3:8b", "qwen3",
    )
    with pytest.raises(ValueError):
        dialect.models({"data": []})
    with pytest.raises(ValueError):
        dialect.translator("embedding", "m", {})


# --- encode ----------------------------------------------------------------------------------

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()


@st.composite
def tool_call(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "id": draw(st.text("abcdef0123456789", min_size=4, max_size=8)).join(["call_", ""]),
        "type": "function",
        "function": {
            "name": draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True)),
            "arguments": orjson.dumps(draw(ARGUMENTS)).decode(),
        },
    }


@st.composite
def message(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(["system", "developer", "user", "assistant"]))
    if role == "user" and draw(st.booleans()):
        parts: list[dict[str, Any]] = draw(st.lists(st.one_of(
            st.builds(lambda t: {"type": "text", "text": t}, TEXT),
            st.just({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}),
        ), max_size=4))
        return {"role": role, "content": parts}
    if role == "assistant" and draw(st.booleans()):
        return {"role": role, "content": draw(st.one_of(st.none(), TEXT)),
                "tool_calls": draw(st.lists(tool_call(), min_size=1, max_size=3))}
    return {"role": role, "content": draw(TEXT)}


@st.composite
def chat_body(draw: st.DrawFn) -> dict[str, Any]:
    messages = draw(st.lists(message(), min_size=1, max_size=6))
    # Every tool call gets its answer, as a client sends them back.
    for i in reversed(range(len(messages))):
        calls = messages[i].get("tool_calls") or []
        messages[i + 1:i + 1] = [
            {"role": "tool", "tool_call_id": call["id"], "content": draw(TEXT)} for call in calls
        ]
    body: dict[str, Any] = {"model": "client-name", "messages": messages}
    for key, value in (
        ("temperature", st.floats(0, 2)), ("top_p", st.floats(0, 1)),
        ("seed", st.integers(0, 2**31)), ("max_tokens", st.integers(1, 4096)),
        ("max_completion_tokens", st.integers(1, 4096)),
        ("presence_penalty", st.floats(-2, 2)), ("frequency_penalty", st.floats(-2, 2)),
        ("stop", st.one_of(TEXT, st.lists(TEXT, max_size=3))), ("stream", st.booleans()),
        ("response_format", st.sampled_from([
            {"type": "text"}, {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        ])),
    ):
        if draw(st.booleans()):
            body[key] = draw(value)
    return body


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p["type"] == "text")


@PURE
@given(chat_body())
def test_encode_chat_keeps_meaning(body: dict[str, Any]) -> None:
    wire = orjson.loads(DIALECT.encode("chat", body, "llama3:8b"))
    ollama_types.ChatRequest.model_validate(wire)  # the official client's request type accepts it
    assert wire["model"] == "llama3:8b"
    assert wire["stream"] is (body.get("stream") is True)  # always explicit
    names = {}
    assert len(wire["messages"]) == len(body["messages"])
    for sent, got in zip(body["messages"], wire["messages"], strict=True):
        role = {"developer": "system"}.get(sent["role"], sent["role"])
        assert got["role"] == role
        assert got["content"] == _text_of(sent["content"])
        images = [p for p in sent["content"] or [] if isinstance(p, dict)
                  and p["type"] == "image_url"] if isinstance(sent["content"], list) else []
        assert got.get("images", []) == [PNG] * len(images)
        for call, out in zip(sent.get("tool_calls", []), got.get("tool_calls", []), strict=True):
            assert out["function"]["name"] == call["function"]["name"]
            assert out["function"]["arguments"] == orjson.loads(call["function"]["arguments"])
            names[call["id"]] = call["function"]["name"]
        if role == "tool":
            assert got["tool_name"] == names[sent["tool_call_id"]]
    options = wire.get("options", {})
    for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        assert options.get(key) == body.get(key)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    assert options.get("num_predict") == limit
    stop = body.get("stop")
    assert options.get("stop") == ([stop] if isinstance(stop, str) else stop)
    expected_format = {"json_object": "json", "json_schema": {"type": "object"}}.get(
        (body.get("response_format") or {}).get("type", "")
    )
    assert wire.get("format") == expected_format
    assert "stream_options" not in wire


def test_encode_tools_and_choice() -> None:
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "d", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }}
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    wire = encode_body("chat", body, "m")
    ollama_types.ChatRequest.model_validate(wire)
    assert wire["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "d",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }}]
    assert "tools" not in encode_body("chat", {**body, "tool_choice": "none"}, "m")
    assert "tools" in encode_body("chat", {**body, "tool_choice": "auto"}, "m")
    forced = {**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    assert "tool_choice" not in encode_body("chat", forced, "m")
    assert encode_body("chat", forced, "m", drop_params=False)["tool_choice"] == (
        forced["tool_choice"]
    )


def test_drop_params_and_native_fields() -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}], "user": "u1", "n": 1,
        "logit_bias": {"1": 2}, "keep_alive": "10m", "think": True,
        "options": {"num_ctx": 8192, "temperature": 0.1}, "temperature": 0.9,
        "stream_options": {"include_usage": True},
    }
    dropped = encode_body("chat", body, "m")
    assert dropped == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False,
        "options": {"temperature": 0.1, "num_ctx": 8192},  # `options` wins: it is explicit
        "keep_alive": "10m", "think": True,
    }
    kept = encode_body("chat", body, "m", drop_params=False)
    assert {k: kept[k] for k in ("user", "n", "logit_bias")} == {
        "user": "u1", "n": 1, "logit_bias": {"1": 2},
    }
    assert "stream_options" not in kept  # lb's, never the node's


def test_encode_completion_and_embedding() -> None:
    wire = encode_body("completion", {"prompt": ["once"], "max_tokens": 5, "suffix": "end",
                                      "stream": True, "echo": True}, "m")
    assert wire == {"model": "m", "prompt": "once", "stream": True, "suffix": "end",
                    "options": {"num_predict": 5}}
    ollama_types.GenerateRequest.model_validate(wire)
    wire = encode_body("embedding", {"input": ["a", "b"], "dimensions": 8,
                                     "encoding_format": "base64", "user": "x"}, "e")
    assert wire == {"model": "e", "input": ["a", "b"], "dimensions": 8}
    ollama_types.EmbedRequest.model_validate(wire)


@pytest.mark.parametrize(("kind", "body", "param"), [
    ("chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "messages"),
    ("chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/svg+xml,<svg/>"}}]}]},
     "messages"),
    ("chat", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]}, "messages"),
    ("chat", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages"),
    ("chat", {"messages": "hi"}, "messages"),
    ("chat", {"messages": [], "response_format": {"type": "json_schema"}}, "response_format"),
    ("chat", {"messages": [], "options": [1]}, "options"),
    ("completion", {"prompt": [1, 2, 3]}, "prompt"),
    ("completion", {"prompt": ["a", "b"]}, "prompt"),
    ("embedding", {"input": [[1, 2]]}, "input"),
])
def test_encode_refuses_what_ollama_cannot_take(
    kind: ModelKind, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        DIALECT.encode(kind, body, "m")
    assert caught.value.param == param and caught.value.status == 400


def test_http_image_error_says_why() -> None:
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}
    with pytest.raises(BadRequest, match="only base64 images"):
        DIALECT.encode("chat", body, "m")


# --- decode ----------------------------------------------------------------------------------

DONE_REASON = st.sampled_from([None, "stop", "length"])
COUNT = st.integers(0, 10**6)


@PURE
@given(TEXT, st.lists(ARGUMENTS, max_size=3), DONE_REASON, COUNT, COUNT, TEXT)
def test_decode_chat_validates_and_keeps_meaning(
    content: str, calls: list[dict[str, Any]], reason: str | None, prompt: int, completion: int,
    thinking: str,
) -> None:
    answer = {
        "model": "llama3:8b", "created_at": "2024-07-22T20:33:28.123648Z",
        "message": {"role": "assistant", "content": content, "thinking": thinking,
                    "tool_calls": [{"function": {"name": f"f{i}", "arguments": a}}
                                   for i, a in enumerate(calls)]},
        "done": True, "done_reason": reason, "prompt_eval_count": prompt,
        "eval_count": completion,
    }
    ollama_types.ChatResponse.model_validate(answer)  # a real Ollama answer's shape
    out = ChatCompletion.model_validate_json(
        DIALECT.decode("chat", 200, orjson.dumps(answer), "client-name")
    )
    assert out.model == "client-name" and out.object == "chat.completion"
    choice = out.choices[0]
    assert choice.message.content == (content if content or not calls else None)
    assert [orjson.loads(c.function.arguments) for c in function_calls(choice.message)] == calls
    assert [c.function.name for c in function_calls(choice.message)] == [
        f"f{i}" for i in range(len(calls))
    ]
    assert len({c.id for c in choice.message.tool_calls or []}) == len(calls)
    expected = "tool_calls" if calls else ("length" if reason == "length" else "stop")
    assert choice.finish_reason == expected
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt, completion)
    assert out.usage.total_tokens == prompt + completion
    assert getattr(choice.message, "reasoning_content", None) == (thinking or None)


def test_decode_generate_and_embed() -> None:
    answer = {"model": "m", "created_at": "2024-07-22T20:33:28Z", "response": "Hi there",
              "done": True, "done_reason": "length", "context": [1], "prompt_eval_count": 3,
              "eval_count": 2}
    out = Completion.model_validate_json(DIALECT.decode("completion", 200, orjson.dumps(answer),
                                                        "c"))
    assert out.choices[0].text == "Hi there" and out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.total_tokens == 5
    embed = {"model": "e", "embeddings": [[0.1, 0.2], [0.3, 0.4]], "prompt_eval_count": 4}
    got = CreateEmbeddingResponse.model_validate_json(
        DIALECT.decode("embedding", 200, orjson.dumps(embed), "e-client")
    )
    assert [d.embedding for d in got.data] == [[0.1, 0.2], [0.3, 0.4]]
    assert [d.index for d in got.data] == [0, 1]
    assert got.model == "e-client" and got.usage.prompt_tokens == 4


@pytest.mark.parametrize(("status", "body", "message", "code"), [
    (404, b'{"error":"model \'llama9\' not found"}', "model 'llama9' not found",
     "model_not_found"),
    (404, b'{"error":"model \\"x\\" not found, try pulling it first"}',
     'model "x" not found, try pulling it first', "model_not_found"),
    (400, b'{"error":"invalid options"}', "invalid options", "invalid_request"),
    (500, b'{"error":"llama runner process has terminated"}',
     "llama runner process has terminated", "upstream_error"),
    (502, b"<html>Bad gateway</html>", "<html>Bad gateway</html>", "upstream_error"),
    (503, b"", "Ollama answered 503 without a message", "upstream_error"),
])
def test_decode_errors_as_openai(status: int, body: bytes, message: str, code: str) -> None:
    error = orjson.loads(DIALECT.decode("chat", status, body, "m"))["error"]
    assert error["message"] == message and error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("kind", "body"), [
    ("chat", b"not json"), ("chat", b"[1]"), ("chat", b'{"done": true}'),
    ("completion", b'{"message": {}}'), ("embedding", b'{"embedding": [1]}'),
])
def test_decode_refuses_what_is_not_an_answer(kind: ModelKind, body: bytes) -> None:
    with pytest.raises(ValueError):
        DIALECT.decode(kind, 200, body, "m")


# --- streams ---------------------------------------------------------------------------------


@st.composite
def chat_stream(draw: st.DrawFn) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 6))):
        message: dict[str, Any] = {"role": "assistant", "content": draw(TEXT)}
        if draw(st.integers(0, 4)) == 0:
            message["thinking"] = draw(TEXT)
        if draw(st.integers(0, 5)) == 0:
            message["tool_calls"] = [
                {"function": {"name": draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True)),
                              "arguments": draw(ARGUMENTS)}}
                for _ in range(draw(st.integers(1, 2)))
            ]
        lines.append({"model": "m", "created_at": "2025-01-01T00:00:00Z", "message": message,
                      "done": False})
    lines.append({
        "model": "m", "created_at": "2025-01-01T00:00:01Z",
        "message": {"role": "assistant", "content": draw(TEXT)},
        "done": True, "done_reason": draw(DONE_REASON),
        "prompt_eval_count": draw(COUNT), "eval_count": draw(COUNT),
    })
    return lines


def _translate(pieces: list[bytes], include_usage: bool, kind: ModelKind = "chat") -> bytes:
    translator = OllamaStreamTranslator(kind, "client-name", include_usage=include_usage,
                                        ident="chatcmpl-fixed", created=1700000000)
    return b"".join(translator.feed(piece) for piece in pieces) + translator.finish()


@PURE
@given(chat_stream(), st.lists(st.integers(0, 2000), max_size=12), st.booleans(),
       st.booleans())
def test_stream_split_anywhere_same_events(
    lines: list[dict[str, Any]], cuts: list[int], include_usage: bool, crlf: bool
) -> None:
    data = ndjson(lines, crlf)
    whole = _translate([data], include_usage)
    assert _translate(split_at(data, cuts), include_usage) == whole
    assert _translate([data[i:i + 1] for i in range(len(data))], include_usage) == whole

    got = events(whole)
    assert got[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in got[:-1]]
    assert {c.id for c in chunks} == {"chatcmpl-fixed"}
    assert chunks[0].choices[0].delta.role == "assistant"
    body = chunks[:-1] if include_usage else chunks
    assert all(len(c.choices) == 1 for c in body)
    content = "".join(c.choices[0].delta.content or "" for c in body)
    assert content == "".join(line["message"]["content"] for line in lines)
    thinking = "".join(getattr(c.choices[0].delta, "reasoning_content", "") or "" for c in body)
    assert thinking == "".join(line["message"].get("thinking", "") for line in lines)
    sent_calls = [call for line in lines for call in line["message"].get("tool_calls", [])]
    got_calls = [call for c in body for call in c.choices[0].delta.tool_calls or []]
    assert [c.index for c in got_calls] == list(range(len(sent_calls)))
    assert [orjson.loads(c.function.arguments or "") for c in got_calls if c.function] == [
        call["function"]["arguments"] for call in sent_calls
    ]
    assert all(c.id and c.type == "function" for c in got_calls)
    last = lines[-1]
    finishes = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    expected = ("tool_calls" if sent_calls else
                "length" if last["done_reason"] == "length" else "stop")
    assert finishes == [expected] and body[-1].choices[0].finish_reason == expected
    if include_usage:
        usage = chunks[-1]
        assert usage.choices == [] and usage.usage is not None
        assert usage.usage.prompt_tokens == last["prompt_eval_count"]
        assert usage.usage.completion_tokens == last["eval_count"]


@PURE
@given(st.lists(TEXT, max_size=6), st.lists(st.integers(0, 500), max_size=6), st.booleans())
def test_generate_stream_split_anywhere(
    texts: list[str], cuts: list[int], include_usage: bool
) -> None:
    lines = [{"model": "m", "response": t, "done": False} for t in texts]
    lines.append({"model": "m", "response": "", "done": True, "done_reason": "stop",
                  "context": [1, 2], "prompt_eval_count": 2, "eval_count": len(texts)})
    data = ndjson(lines)
    whole = _translate([data], include_usage, "completion")
    assert _translate(split_at(data, cuts), include_usage, "completion") == whole
    got = events(whole)
    assert got[-1] == "[DONE]"
    chunks = [completion_chunk(e) for e in got[:-1]]
    body = got[:-2] if include_usage else got[:-1]
    assert "".join(c["choices"][0]["text"] for c in body) == "".join(texts)
    reasons = [c["choices"][0]["finish_reason"] for c in body]
    assert reasons == [None] * len([t for t in texts if t]) + ["stop"]
    if include_usage:
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(texts)


def test_stream_error_line_raises_after_what_came_before() -> None:
    translator = DIALECT.translator("chat", "m", {})
    first = translator.feed(b'{"message":{"role":"assistant","content":"Hi"},"done":false}\n')
    assert [e["choices"][0]["delta"] for e in events(first)] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"},
    ]
    with pytest.raises(StreamFailed, match="runner process has terminated"):
        translator.feed(b'{"error":"llama runner process has terminated"}\n')


def test_stream_error_in_the_same_read_as_good_lines() -> None:
    """The events before the error go out; the error comes with the next call."""
    translator = DIALECT.translator("chat", "m", {})
    out = translator.feed(b'{"message":{"content":"Hi"},"done":false}\n{"error":"boom"}\n'
                          b'{"message":{"content":"never"},"done":false}\n')
    assert [e["choices"][0]["delta"].get("content") for e in events(out)] == ["", "Hi"]
    with pytest.raises(StreamFailed, match="boom"):
        translator.finish()
    with pytest.raises(StreamFailed, match="boom"):
        translator.feed(b"")


@pytest.mark.parametrize("data", [
    b"", b'{"message":{"content":"Hi"},"done":false}\n',
    b'{"message":{"content":"Hi"},"done":false}\n{"message":{"content":"th',
])
def test_stream_without_done_is_incomplete(data: bytes) -> None:
    translator = DIALECT.translator("chat", "m", {})
    translator.feed(data)
    with pytest.raises(StreamIncomplete):
        translator.finish()


def test_stream_last_line_without_newline_counts() -> None:
    translator = DIALECT.translator("chat", "m", {"stream_options": {"include_usage": True}})
    out = translator.feed(b'{"message":{"content":"Hi"},"done":true,"eval_count":1}')
    out += translator.finish()
    got = events(out)
    assert got[-1] == "[DONE]" and got[-2]["usage"]["completion_tokens"] == 1
    assert translator.usage == (0, 1)


@pytest.mark.parametrize("line", [b"garbage\n", b"[1,2]\n"])
def test_stream_line_that_is_not_an_object(line: bytes) -> None:
    with pytest.raises(StreamFailed):
        DIALECT.translator("chat", "m", {}).feed(line)


# --- the dialect against the mock Ollama API over real sockets -----------------------------


@asynccontextmanager
async def mock_ollama(**options: Any) -> AsyncIterator[httpx.AsyncClient]:
    node = MockNode(**{"models": ("llama3:8b", "nomic-embed-text"), **options})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(node.serve, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
        nursery.cancel_scope.cancel()


async def call(
    client: httpx.AsyncClient, kind: ModelKind, body: dict[str, Any],
    headers: dict[str, str] | None = None, model: str = "llama3:8b",
) -> tuple[int, bytes]:
    """One request through the dialect: encode, send, then decode or translate the answer."""
    dialect = OllamaDialect()
    stream = body.get("stream") is True
    request = client.build_request(
        "POST", dialect.path(kind, stream), content=dialect.encode(kind, body, model),
        headers={"content-type": "application/json", **(headers or {})},
    )
    response = await client.send(request, stream=True)
    try:
        head = [(k.encode(), v.encode()) for k, v in response.headers.items()]
        if not dialect.is_stream(response.status_code, head):
            body_bytes = await response.aread()
            return response.status_code, dialect.decode(
                kind, response.status_code, body_bytes, "client-name"
            )
        translator = dialect.translator(kind, "client-name", body)
        out = [translator.feed(chunk) async for chunk in response.aiter_raw()]
        return 200, b"".join(out) + translator.finish()
    finally:
        await response.aclose()


CHAT = {"messages": [{"role": "user", "content": "say hello to me"}]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]},
    }, "required": ["city"]},
}}


async def test_chat_over_sockets() -> None:
    with trio.fail_after(10):
        async with mock_ollama(tokens=5) as client:
            status, body = await call(client, "chat", {**CHAT, "max_tokens": 3})
            out = ChatCompletion.model_validate_json(body)
            assert status == 200 and out.choices[0].message.content == "Lorem ipsum dolor"
            assert out.choices[0].finish_reason == "length"
            assert out.usage is not None
            assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (4, 3)

            status, sse = await call(client, "chat", {
                **CHAT, "stream": True, "stream_options": {"include_usage": True},
            })
            got = events(sse)
            chunks = [ChatCompletionChunk.model_validate(e) for e in got[:-1]]
            assert got[-1] == "[DONE]" and chunks[0].choices[0].delta.role == "assistant"
            assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == (
                "Lorem ipsum dolor sit amet"
            )
            assert chunks[-2].choices[0].finish_reason == "stop"
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


async def test_tool_calls_over_sockets() -> None:
    with trio.fail_after(10):
        async with mock_ollama() as client:
            status, body = await call(client, "chat", {**CHAT, "tools": [WEATHER]})
            out = ChatCompletion.model_validate_json(body)
            calls = function_calls(out.choices[0].message)
            assert out.choices[0].finish_reason == "tool_calls" and len(calls) == 1
            assert calls[0].function.name == "get_weather"
            assert orjson.loads(calls[0].function.arguments) == {"city": "lorem", "unit": "c"}

            # The client runs the tool and sends the result back: the node answers text.
            followup = {"messages": [
                *CHAT["messages"],
                out.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
            ], "tools": [WEATHER], "stream": True}
            status, sse = await call(client, "chat", followup)
            chunks = [ChatCompletionChunk.model_validate(e) for e in events(sse)[:-1]]
            assert chunks[-1].choices[0].finish_reason == "stop"
            sent = orjson.loads((await client.get("/mock/requests")).content)[-1]["body"]
            assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == {
                "city": "lorem", "unit": "c",
            }
            assert sent["messages"][2] == {"role": "tool", "content": "sunny",
                                           "tool_name": "get_weather"}

            status, sse = await call(client, "chat", {**CHAT, "tools": [WEATHER],
                                                      "stream": True},
                                     headers={"x-mock-tool-calls": "1"})
            assert status == 200
            chunks = [ChatCompletionChunk.model_validate(e) for e in events(sse)[:-1]]
            deltas = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
            assert [(d.index, d.function.name if d.function else None) for d in deltas] == [
                (0, "get_weather"),
            ]
            assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_generate_embed_and_images_over_sockets() -> None:
    with trio.fail_after(10):
        async with mock_ollama(tokens=2) as client:
            status, body = await call(client, "completion", {"prompt": "once upon"})
            out = Completion.model_validate_json(body)
            assert out.choices[0].text == "Lorem ipsum"
            status, sse = await call(client, "completion", {"prompt": "x", "stream": True})
            texts = [e["choices"][0]["text"] for e in events(sse)[:-1]]
            for e in events(sse)[:-1]:
                completion_chunk(e)
            assert "".join(texts) == "Lorem ipsum"
            status, body = await call(client, "embedding", {"input": ["a b", "c"],
                                                            "dimensions": 16},
                                      model="nomic-embed-text")
            emb = CreateEmbeddingResponse.model_validate_json(body)
            assert [len(d.embedding) for d in emb.data] == [16, 16]
            assert emb.usage.prompt_tokens == 3
            image = {"messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ]}]}
            status, body = await call(client, "chat", image)
            assert status == 200
            sent = orjson.loads((await client.get("/mock/requests")).content)[-1]["body"]
            assert sent["messages"][0] == {"role": "user", "content": "what is this",
                                           "images": [PNG]}


async def test_errors_over_sockets() -> None:
    with trio.fail_after(10):
        async with mock_ollama() as client:
            status, body = await call(client, "chat", CHAT, model="llama9")
            error = orjson.loads(body)["error"]
            assert status == 404 and error["code"] == "model_not_found"
            assert error["message"] == "model 'llama9' not found"

            status, body = await call(client, "chat", CHAT, headers={
                "x-mock-fault": "status=503"})
            assert status == 503
            assert orjson.loads(body)["error"]["message"].startswith("Injected fault")

            with pytest.raises(StreamFailed, match="mock stream error after 3 lines"):
                await call(client, "chat", {**CHAT, "stream": True},
                           headers={"x-mock-stream-error": "3"})
            with pytest.raises((StreamIncomplete, httpx.RemoteProtocolError)):
                await call(client, "chat", {**CHAT, "stream": True},
                           headers={"x-mock-fault": "drop-after=2"})


def test_error_line_without_newline_keeps_its_message() -> None:
    translator = DIALECT.translator("chat", "m", {})
    translator.feed(b'{"error":"out of memory"}')
    with pytest.raises(StreamFailed, match="out of memory"):
        translator.finish()
