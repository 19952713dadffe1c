"""The Anthropic node dialect: pure translators (hypothesis), then over real sockets against
the mock Anthropic node, the answers checked with the openai SDK's own types."""

from __future__ import annotations

import base64
import itertools
from typing import Any

import httpx
import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from lb.errors import BadRequest
from lb.testing import MockNode
from lb.testing.mock_anthropic import (
    _check_messages,
    error_event,
    split_message,
    stream_events,
)
from lb.upstream.dialects.anthropic import (
    ANTHROPIC,
    AnthropicDialect,
    AnthropicStreamTranslator,
    StreamError,
    decode_message,
    encode_request,
)
from lb.upstream.dialects.base import StreamFailed, StreamIncomplete

# No deadline and no speed check: a loaded CI machine must not turn slowness into a failure.
pure = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

texts = st.text(
    st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12
)
names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=6,
)
inputs = st.dictionaries(names, json_values, max_size=3)


# -- generated OpenAI conversations -----------------------------------------------------------


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Valid OpenAI chat histories: system messages anywhere, users with text or image parts,
    assistants with text and/or tool calls, each call answered by a tool message."""
    messages: list[dict[str, Any]] = []
    ids = iter(range(10_000))
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["system", "user", "user", "assistant"]))
        if kind == "system":
            messages.append({"role": draw(st.sampled_from(["system", "developer"])),
                "content": draw(texts)})
        elif kind == "user":
            if draw(st.booleans()):
                messages.append({"role": "user", "content": draw(texts)})
            else:
                parts = draw(st.lists(
                    texts.map(lambda t: {"type": "text", "text": t})
                    | st.binary(min_size=1, max_size=8).map(lambda b: {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,"
                            + base64.b64encode(b).decode()},
                    })
                    | names.map(lambda n: {
                        "type": "image_url", "image_url": {"url": f"https://x.test/{n}.png"},
                    }),
                    min_size=1, max_size=3,
                ))
                messages.append({"role": "user", "content": parts})
        else:
            calls = [
                {"id": f"call_{next(ids)}", "type": "function",
                 "function": {"name": name, "arguments": orjson.dumps(args).decode()}}
                for name, args in draw(st.lists(st.tuples(names, inputs), max_size=2))
            ]
            text = draw(st.none() | texts) if calls else draw(texts)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            messages.append(message)
            messages.extend(
                {"role": "tool", "tool_call_id": call["id"], "content": draw(texts)}
                for call in calls
            )
    return messages


def openai_items(messages: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    """What a conversation says, in order, system messages aside."""
    items: list[tuple[str, str, Any]] = []
    for m in messages:
        if m["role"] in ("system", "developer"):
            continue
        if m["role"] == "tool":
            items.append(("user", "tool_result", (m["tool_call_id"], m["content"])))
            continue
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            if part["type"] == "text":
                items.append((m["role"], "text", part["text"]))
            else:
                items.append((m["role"], "image", part["image_url"]["url"]))
        for call in m.get("tool_calls", ()):
            items.append(("assistant", "tool_use", (
                call["id"], call["function"]["name"], orjson.loads(call["function"]["arguments"]),
            )))
    return items


def anthropic_items(turns: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    items: list[tuple[str, str, Any]] = []
    for turn in turns:
        for block in turn["content"]:
            kind = block["type"]
            if kind == "text":
                items.append((turn["role"], "text", block["text"]))
            elif kind == "image":
                source = block["source"]
                url = (source["url"] if source["type"] == "url"
                    else f"data:{source['media_type']};base64,{source['data']}")
                items.append((turn["role"], "image", url))
            elif kind == "tool_use":
                items.append((turn["role"], "tool_use",
                    (block["id"], block["name"], block["input"])))
            else:
                items.append((turn["role"], "tool_result",
                    (block["tool_use_id"], block["content"])))
    return items


@pure
@given(conversations())
def test_encode_keeps_every_message_and_merges_the_system(
    messages: list[dict[str, Any]],
) -> None:
    out = encode_request({"model": "gpt-x", "messages": messages}, "claude-x")
    assert out["model"] == "claude-x" and out["max_tokens"] == 4096
    system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    turns = out["messages"]
    if len(system) == len(messages):  # system only: it becomes the user's turn
        assert "system" not in out
        assert anthropic_items(turns) == [("user", "text", "\n\n".join(system))]
    else:
        assert out.get("system") == ("\n\n".join(system) if system else None)
        assert anthropic_items(turns) == openai_items(messages)
    roles = [t["role"] for t in turns]
    assert all(a != b for a, b in itertools.pairwise(roles))
    _check_messages(turns)  # what the (strict) mock Anthropic node accepts


@pure
@given(
    st.none() | st.floats(0, 2), st.none() | st.integers(1, 10_000),
    st.none() | st.integers(1, 10_000), st.none() | texts | st.lists(texts, max_size=3),
)
def test_encode_parameters(
    temperature: float | None, max_tokens: int | None, max_completion: int | None,
    stop: str | list[str] | None,
) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "top_p": 0.5,
        "top_k": 5, "stream": True, "user": "u1", "seed": 3, "stream_options": {}}
    for key, value in (("temperature", temperature), ("max_tokens", max_tokens),
            ("max_completion_tokens", max_completion), ("stop", stop)):
        if value is not None:
            body[key] = value
    out = encode_request(body, "claude-x", default_max_tokens=77)
    assert out["max_tokens"] == (max_completion or max_tokens or 77)
    if temperature is None:
        assert "temperature" not in out
    else:
        assert out["temperature"] == min(temperature, 1.0)
    assert out.get("stop_sequences") == ([stop] if isinstance(stop, str) else stop or None)
    assert out["top_p"] == 0.5 and out["top_k"] == 5 and out["stream"] is True
    assert out["metadata"] == {"user_id": "u1"}
    assert "seed" not in out and "stream_options" not in out
    kept = encode_request(body, "claude-x", drop_params=False)
    assert kept["seed"] == 3 and "stream_options" not in kept


def test_encode_tools_and_tool_choice() -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }}, {"type": "function", "function": {"name": "now"}}]
    base = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    out = encode_request(base, "m")
    assert out["tools"] == [
        {"name": "get_weather", "description": "Weather of a city",
         "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out
    for choice, expected in (
        ("auto", {"type": "auto"}), ("none", {"type": "none"}), ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "now"}}, {"type": "tool", "name": "now"}),
    ):
        assert encode_request({**base, "tool_choice": choice}, "m")["tool_choice"] == expected
    serial = encode_request({**base, "parallel_tool_calls": False}, "m")
    assert serial["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    alone = encode_request({**base, "tools": [], "tool_choice": "none"}, "m")
    assert "tools" not in alone and "tool_choice" not in alone


def test_cache_control_on_parts_is_kept() -> None:
    mark = {"type": "ephemeral"}
    out = encode_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "long document", "cache_control": mark},
        {"type": "text", "text": "question"},
    ]}]}, "m")
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "long document", "cache_control": mark},
        {"type": "text", "text": "question"},
    ]


def test_encode_tool_results_merge_into_one_user_turn_first() -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "two"}]},
        {"role": "user", "content": "thanks"},
    ]
    turns = encode_request({"messages": messages}, "m")["messages"]
    assert turns[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "c1", "content": "one"},
        {"type": "tool_result", "tool_use_id": "c2",
         "content": [{"type": "text", "text": "two"}]},
        {"type": "text", "text": "thanks"},
    ]}
    assert turns[1]["content"][1] == {"type": "tool_use", "id": "c2", "name": "g", "input": {}}


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes",
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search"}]},
     "tools[0]"),
])
def test_encode_refuses_what_anthropic_cannot_express(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        encode_request(body, "m")
    assert caught.value.param == param and caught.value.status == 400


def test_embeddings_and_completions_are_refused() -> None:
    assert ANTHROPIC.path("chat", True) == "/v1/messages"
    for kind in ("embedding", "completion"):
        with pytest.raises(BadRequest, match=r"no .* endpoint"):
            ANTHROPIC.path(kind, False)  # type: ignore[arg-type]


def test_auth_headers() -> None:
    assert AnthropicDialect(version="2024-01-01").auth("sk-1") == [
        (b"anthropic-version", b"2024-01-01"), (b"x-api-key", b"sk-1"),
    ]
    assert ANTHROPIC.auth("") == [(b"anthropic-version", b"2023-06-01")]


def test_models_listing() -> None:
    payload = {"data": [{"type": "model", "id": "claude-a"}, {"id": "claude-b"}, {"id": ""}],
        "has_more": False}
    assert ANTHROPIC.models(payload) == ("claude-a", "claude-b")
    with pytest.raises(ValueError):
        ANTHROPIC.models({"models": []})


# -- generated Anthropic answers --------------------------------------------------------------

stop_reasons = st.sampled_from(
    ["end_turn", "stop_sequence", "max_tokens", "tool_use", "refusal", "pause_turn", None]
)
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
    "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop", None: "stop"}


@st.composite
def messages_(draw: st.DrawFn) -> dict[str, Any]:
    blocks = draw(st.lists(st.one_of(
        texts.map(lambda t: {"type": "text", "text": t}),
        texts.map(lambda t: {"type": "thinking", "thinking": t, "signature": "s"}),
        st.tuples(names, inputs).map(lambda p: {"type": "tool_use", "name": p[0],
            "input": p[1]}),
    ), max_size=4))
    for k, block in enumerate(blocks):
        if block["type"] == "tool_use":
            block["id"] = f"toolu_{k}"
    counts = st.integers(0, 10_000)
    return {
        "id": draw(st.from_regex(r"msg_[A-Za-z0-9]{1,10}", fullmatch=True)), "type": "message",
        "role": "assistant", "model": "claude-x", "content": blocks,
        "stop_reason": draw(stop_reasons), "stop_sequence": None,
        "usage": {"input_tokens": draw(counts), "output_tokens": draw(counts),
            "cache_creation_input_tokens": draw(counts), "cache_read_input_tokens": draw(counts)},
    }


def expected_reply(message: dict[str, Any]) -> tuple[str | None, list[tuple[str, str, Any]],
        str | None]:
    blocks = message["content"]
    text = "".join(b["text"] for b in blocks if b["type"] == "text")
    calls = [(b["id"], b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"]
    thinking = "".join(b["thinking"] for b in blocks if b["type"] == "thinking")
    has_text = any(b["type"] == "text" for b in blocks)
    return (text if has_text or not calls else None), calls, thinking or None


@pure
@given(messages_())
def test_decode_gives_a_valid_openai_answer(message: dict[str, Any]) -> None:
    raw = ANTHROPIC.decode("chat", 200, orjson.dumps(message), "handle")
    answer = ChatCompletion.model_validate(orjson.loads(raw))
    assert answer.id == f"chatcmpl-{message['id']}" and answer.model == "handle"
    choice = answer.choices[0]
    text, calls, thinking = expected_reply(message)
    assert choice.message.content == text
    got = [(c.id, c.function.name, orjson.loads(c.function.arguments))
        for c in choice.message.tool_calls or ()]  # type: ignore[union-attr]
    assert got == calls
    assert getattr(choice.message, "reasoning_content", None) == thinking
    assert choice.finish_reason == FINISH[message["stop_reason"]]
    usage = message["usage"]
    prompt = (usage["input_tokens"] + usage["cache_creation_input_tokens"]
        + usage["cache_read_input_tokens"])
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        prompt, usage["output_tokens"])
    assert answer.usage.total_tokens == prompt + usage["output_tokens"]


def sse_payloads(raw: bytes) -> list[bytes]:
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    assert all(e.startswith(b"data: ") for e in events[:-1])
    return [e[6:] for e in events[:-1]]


def accumulate(raw: bytes) -> dict[str, Any]:
    """Rebuild the answer from OpenAI chunks, checking each with the openai SDK's type."""
    payloads = sse_payloads(raw)
    assert payloads[-1] == b"[DONE]"
    chunks = [ChatCompletionChunk.model_validate(orjson.loads(p)) for p in payloads[:-1]]
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text: list[str] = []
    thinking: list[str] = []
    calls: dict[int, list[Any]] = {}
    finish = []
    usage = None
    for chunk in chunks:
        if not chunk.choices:
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        if choice.finish_reason is not None:
            finish.append(choice.finish_reason)
        delta = choice.delta
        if delta.content:
            text.append(delta.content)
        if getattr(delta, "reasoning_content", None):
            thinking.append(delta.reasoning_content)  # type: ignore[attr-defined]
        for call in delta.tool_calls or ():
            if call.id is not None:
                assert call.index not in calls and call.function is not None
                calls[call.index] = [call.id, call.function.name, ""]
            assert call.function is not None
            calls[call.index][2] += call.function.arguments or ""
    assert len(finish) == 1 and chunks[-1 if usage is None else -2].choices[0].finish_reason
    return {"id": chunks[0].id, "text": "".join(text), "thinking": "".join(thinking) or None,
        "calls": [(i, n, orjson.loads(a or "{}")) for i, n, a in
            (calls[k] for k in sorted(calls))],
        "finish": finish[0], "usage": usage}


def stream_of(message: dict[str, Any], size: int) -> bytes:
    head = {k: message[k] for k in ("id", "type", "role", "model")}
    return b"".join(stream_events(head, split_message(message, size), message["stop_reason"],
        None, message["usage"]))


def translate(raw: bytes, cuts: list[int], include_usage: bool = False) -> bytes:
    translator = AnthropicStreamTranslator("handle", include_usage, created=1)
    out = []
    previous = 0
    for cut in [*sorted(cuts), len(raw)]:
        out.append(translator.feed(raw[previous:cut]))
        previous = cut
    out.append(translator.finish())
    return b"".join(out)


@pure
@given(messages_(), st.integers(1, 5), st.booleans(), st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.data())
def test_stream_translation_split_anywhere(
    message: dict[str, Any], size: int, include_usage: bool, newline: bytes, data: st.DataObject,
) -> None:
    raw = stream_of(message, size).replace(b"\n", newline)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    whole = translate(raw, [], include_usage)
    assert translate(raw, cuts, include_usage) == whole
    assert translate(raw, list(range(len(raw))), include_usage) == whole  # byte by byte
    got = accumulate(whole)
    text, calls, thinking = expected_reply(message)
    assert got["id"] == f"chatcmpl-{message['id']}"
    assert got["text"] == (text or "") and got["thinking"] == thinking
    assert got["calls"] == calls
    assert got["finish"] == FINISH[message["stop_reason"]]
    if include_usage:
        decoded = decode_message(message, "handle", 1)["usage"]
        assert got["usage"] is not None
        assert got["usage"].model_dump(exclude_none=True) == decoded
    else:
        assert got["usage"] is None


@pure
@given(messages_(), st.data())
def test_an_error_event_raises_after_the_same_events_however_split(
    message: dict[str, Any], data: st.DataObject,
) -> None:
    events = stream_events({k: message[k] for k in ("id", "type", "role", "model")},
        split_message(message, 3), message["stop_reason"], None, message["usage"])
    at = data.draw(st.integers(0, len(events) - 1))
    raw = b"".join(events[:at]) + error_event("overloaded_error", "Overloaded")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))

    def run(cuts: list[int]) -> tuple[bytes, StreamError]:
        translator = AnthropicStreamTranslator("handle", False, created=1)
        out = []
        previous = 0
        try:
            for cut in [*cuts, len(raw)]:
                out.append(translator.feed(raw[previous:cut]))
                previous = cut
            translator.finish()
        except StreamError as exc:
            return b"".join(out), exc
        raise AssertionError("no StreamError")

    split, error = run(cuts)
    whole = run([])[0]
    assert (split, error.status, error.error_type) == (whole, 529, "overloaded_error")
    assert isinstance(error, StreamFailed) and error.message == "Overloaded"
    # every event before the error was translated, and sent before the error is raised
    expected = AnthropicStreamTranslator("handle", False, created=1).feed(b"".join(events[:at]))
    assert whole == expected


@pure
@given(messages_(), st.data())
def test_a_stream_cut_before_message_stop_is_incomplete(
    message: dict[str, Any], data: st.DataObject,
) -> None:
    raw = stream_of(message, 4)
    end = raw.rindex(b"event: message_stop")
    translator = AnthropicStreamTranslator("handle", False, created=1)
    translator.feed(raw[: data.draw(st.integers(0, end))])
    with pytest.raises(StreamIncomplete):
        translator.finish()


def test_translator_reports_usage_and_ignores_unknown_events() -> None:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "c",
        "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 2}}
    raw = stream_of(message, 2)
    raw = raw.replace(b"event: ping", b': comment\nevent: future\ndata: {"type":"future"}\n\n'
        b"event: ping", 1)
    translator = ANTHROPIC.translator("chat", "handle", {"stream_options": {
        "include_usage": True}})
    assert translator.usage is None
    out = translator.feed(raw) + translator.finish()
    assert translator.usage == (7, 7)
    got = accumulate(out)
    assert got["text"] == "hello" and got["usage"].prompt_tokens_details.cached_tokens == 2


@pytest.mark.parametrize(("status", "kind", "code"), [
    (400, "invalid_request_error", "invalid_request_error"),
    (401, "authentication_error", "authentication_error"),
    (404, "not_found_error", "not_found_error"),
    (429, "rate_limit_error", "rate_limit_error"),
    (529, "overloaded_error", "overloaded_error"),
    (500, "api_error", "api_error"),
])
def test_decode_errors(status: int, kind: str, code: str) -> None:
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": "went wrong"}})
    error = orjson.loads(ANTHROPIC.decode("chat", status, body, "m"))["error"]
    assert error["code"] == code and error["param"] is None
    assert "went wrong" in error["message"]
    if status == 401:
        assert "lb's credential" in error["message"]


def test_decode_error_that_is_not_json() -> None:
    error = orjson.loads(ANTHROPIC.decode("chat", 502, b"<html>Bad gateway</html>", "m"))
    assert error["error"]["message"] == "<html>Bad gateway</html>"
    assert error["error"]["code"] == "api_error"
    with pytest.raises(ValueError):
        ANTHROPIC.decode("chat", 200, b"not json", "m")


# -- over real sockets: dialect <-> the mock Anthropic node -------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
}}}]


async def call(
    base: str, body: dict[str, Any], key: str = "sk-test", fault: str | None = None,
    failed: list[tuple[bytes, StreamError]] | None = None,
) -> tuple[int, bytes, bool]:
    """Send an OpenAI body through the dialect to the node; (status, OpenAI bytes, stream).
    A stream's error goes to `failed` with the bytes translated before it."""
    stream = body.get("stream") is True
    headers = dict((k.decode(), v.decode()) for k, v in ANTHROPIC.auth(key))
    if fault:
        headers["x-mock-fault"] = fault
    async with httpx.AsyncClient(timeout=10) as client, client.stream(
        "POST", base + ANTHROPIC.path("chat", stream), headers=headers,
        content=ANTHROPIC.encode("chat", body, "claude-x"),
    ) as response:
        head = [(k.lower(), v) for k, v in response.headers.raw]
        if not ANTHROPIC.is_stream(response.status_code, head):
            raw = await response.aread()
            return response.status_code, ANTHROPIC.decode("chat", response.status_code, raw,
                "handle"), False
        translator = ANTHROPIC.translator("chat", "handle", body)
        out = []
        try:
            async for piece in response.aiter_raw():
                out.append(translator.feed(piece))
            out.append(translator.finish())
        except StreamError as exc:
            assert failed is not None, exc
            failed.append((b"".join(out), exc))
        return response.status_code, b"".join(out), True


async def test_tool_loop_through_the_dialect_and_the_mock_node() -> None:
    node = MockNode(dialect="anthropic", models=("claude-x",), api_key="sk-test", tokens=5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(node.serve, "127.0.0.1", 0)
            base = f"http://127.0.0.1:{port}"
            history: list[dict[str, Any]] = [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "please call get_weather"},
            ]
            status, raw, streamed = await call(base, {"messages": history, "tools": TOOLS,
                "stream": True, "stream_options": {"include_usage": True}})
            assert status == 200 and streamed
            got = accumulate(raw)
            assert got["finish"] == "tool_calls" and got["text"] == "Calling get_weather."
            [(call_id, name, args)] = got["calls"]
            assert (name, args) == ("get_weather", {"city": "lorem", "days": 1})
            assert got["usage"].prompt_tokens == 5  # words: "be brief", "please call get_weather"

            status, raw, _ = await call(base, {"messages": history, "tools": TOOLS})
            answer = ChatCompletion.model_validate(orjson.loads(raw))
            assert answer.choices[0].finish_reason == "tool_calls"
            assert answer.choices[0].message.tool_calls is not None

            history += [
                {"role": "assistant", "content": None, "tool_calls": [{"id": call_id,
                    "type": "function", "function": {"name": name,
                    "arguments": orjson.dumps(args).decode()}}]},
                {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
            ]
            status, raw, _ = await call(base, {"messages": history, "tools": TOOLS,
                "max_tokens": 3})
            answer = ChatCompletion.model_validate(orjson.loads(raw))
            assert status == 200 and answer.choices[0].message.content == "Lorem ipsum dolor"
            assert answer.choices[0].finish_reason == "length"
            status, raw, _ = await call(base, {"messages": history, "stop": "dolor",
                "stream": True})
            got = accumulate(raw)
            assert got["text"] == "Lorem ipsum " and got["finish"] == "stop"
            nursery.cancel_scope.cancel()


async def test_errors_through_the_dialect_and_the_mock_node() -> None:
    node = MockNode(dialect="anthropic", models=("claude-x",), api_key="sk-test")
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(node.serve, "127.0.0.1", 0)
            base = f"http://127.0.0.1:{port}"
            status, raw, _ = await call(base, {**chat, "stream": True}, fault="status=529")
            error = orjson.loads(raw)["error"]
            assert status == 529 and error["code"] == "overloaded_error"
            status, raw, _ = await call(base, chat, key="wrong")
            error = orjson.loads(raw)["error"]
            assert status == 401 and "lb's credential" in error["message"]
            status, raw, _ = await call(base, {**chat, "seed": 1}, key="sk-test")
            assert status == 200  # dropped: drop_params
            failed: list[tuple[bytes, StreamError]] = []
            await call(base, {**chat, "stream": True}, fault="error-after=4", failed=failed)
            [(sent, error)] = failed
            assert error.status == 529 and error.error_type == "overloaded_error"
            before = [orjson.loads(p) for p in sse_payloads(sent)]
            assert [c["choices"][0]["delta"] for c in before] == [
                {"role": "assistant", "content": ""}, {"content": "Lorem"},
            ]
            nursery.cancel_scope.cancel()


def test_message_delta_usage_is_cumulative() -> None:
    """Newer API versions repeat the whole usage in message_delta: the last word wins."""
    translator = AnthropicStreamTranslator("handle", True, created=1)
    translator.feed(
        b'data: {"type":"message_start","message":{"id":"msg_2","usage":'
        b'{"input_tokens":4,"output_tokens":1,"cache_creation_input_tokens":6}}}\n\n'
    )
    assert translator.usage == (10, 1)
    translator.feed(
        b'data: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},'
        b'"usage":{"input_tokens":5,"output_tokens":3}}\n\ndata: {"type":"message_stop"}\n\n'
    )
    assert translator.usage == (11, 3)
    last = sse_payloads(translator.finish())[-2]
    assert orjson.loads(last)["usage"] == {
        "prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
    }
