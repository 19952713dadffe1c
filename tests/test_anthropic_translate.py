"""The pure Anthropic <-> OpenAI translators: hypothesis round trips, streams split anywhere."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.api import anthropic_translate as tr
from lb.errors import BadRequest, LBError, ModelNotFound, NoHealthyNode

MODEL = "m"
texts = st.text(min_size=1, max_size=40)
names = st.from_regex(r"[a-z_]{1,12}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)
inputs = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
tool_uses = st.builds(
    lambda n, name, given_input: {"type": "tool_use", "id": f"toolu_{n}", "name": name,
                                  "input": given_input},
    st.integers(0, 10**6), names, inputs,
)
# What an assistant may say: some text, then tool calls (the order models use).
assistant_contents = st.tuples(st.lists(texts, max_size=2), st.lists(tool_uses, max_size=3)).map(
    lambda parts: [{"type": "text", "text": t} for t in parts[0]] + parts[1]
).filter(bool)


def parse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        head, data = block.split(b"\n", 1)
        assert head.startswith(b"event: ") and data.startswith(b"data: ")
        payload = orjson.loads(data[6:])
        assert payload["type"] == head[7:].decode()
        events.append((payload["type"], payload))
    return events


def accumulate(raw: bytes) -> dict[str, Any]:
    """The message a client builds from the events (as the SDK's accumulator does), checking
    the sequence on the way: message_start first, blocks opened before their deltas and
    closed once, message_stop last."""
    events = parse_events(raw)
    assert [events[0][0], events[1][0]] == ["message_start", "ping"]
    assert [kind for kind, _ in events[-2:]] == ["message_delta", "message_stop"]
    message = events[0][1]["message"]
    content: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    open_index: int | None = None
    for kind, event in events[2:-2]:
        if kind == "content_block_start":
            assert open_index is None and event["index"] == len(content)
            open_index = event["index"]
            content.append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            delta, block = event["delta"], content[event["index"]]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
        else:
            assert kind == "content_block_stop" and event["index"] == open_index
            open_index = None
    assert open_index is None
    for index, text in partial.items():
        content[index]["input"] = orjson.loads(text)
    final = events[-2][1]
    return {**message, "content": content, **final["delta"], "usage": final["usage"]}


def openai_stream(message: dict[str, Any], pieces: int, finish: str, crlf: bool,
                  usage: dict[str, int] | None) -> bytes:
    """An OpenAI chat stream saying `message` (an OpenAI assistant message)."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": MODEL}
    chunks: list[Any] = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                               "finish_reason": None}]}]
    text = message.get("content") or ""
    step = max(1, len(text) // pieces)
    for i in range(0, len(text), step):
        chunks.append({**head, "choices": [{"index": 0, "delta": {"content": text[i:i + step]},
                                            "finish_reason": None}]})
    for n, call in enumerate(message.get("tool_calls", [])):
        arguments = call["function"]["arguments"]
        first = {"index": n, "id": call["id"], "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": ""}}
        chunks.append({**head, "choices": [{"index": 0, "delta": {"tool_calls": [first]}}]})
        step = max(1, len(arguments) // pieces)
        for i in range(0, len(arguments), step):
            delta = {"tool_calls": [{"index": n, "function": {"arguments": arguments[i:i + step]}}]}
            chunks.append({**head, "choices": [{"index": 0, "delta": delta}]})
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if usage is not None:
        chunks.append({**head, "choices": [], "usage": usage})
    end = b"\r\n\r\n" if crlf else b"\n\n"
    out = b"".join(b"data: " + orjson.dumps(chunk) + end for chunk in chunks)
    return out + b"data: [DONE]" + end


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, last = [], 0
    for point in points:
        out.append(data[last:point])
        last = point
    out.append(data[last:])
    return [part for part in out if part]


def translate(parts: list[bytes], stop: tuple[str, ...] = ()) -> bytes:
    stream = tr.ChatToMessagesStream(MODEL, "msg_x", 7, stop)
    out = b"".join(stream.feed(part) for part in parts)
    return out + stream.close()


def request_with(content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 10, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": content},
    ]}


@settings(deadline=None)  # a byte at a time on a loaded machine: time is not the point
@given(assistant_contents, st.integers(1, 5), st.booleans(),
       st.lists(st.integers(0, 4000), max_size=12))
def test_a_stream_split_anywhere_translates_to_the_same_events(
    content: list[dict[str, Any]], pieces: int, crlf: bool, cuts: list[int]
) -> None:
    chat = tr.messages_to_chat(request_with(content))
    said = chat["messages"][-1]
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    raw = openai_stream(said, pieces, "tool_calls" if "tool_calls" in said else "stop", crlf,
                        usage)
    whole = translate([raw])
    assert translate(split(raw, cuts)) == whole
    assert translate([raw[i:i + 1] for i in range(len(raw))]) == whole  # a byte at a time
    # ... and it means what the node said, as the non-stream translation does.
    answer = {"choices": [{"message": said, "finish_reason": "tool_calls" if "tool_calls" in said
                           else "stop"}], "usage": usage}
    assert accumulate(whole) == tr.chat_to_message(answer, MODEL, "msg_x")


@given(assistant_contents)
def test_anthropic_to_openai_and_back_keeps_text_and_tool_calls(
    content: list[dict[str, Any]],
) -> None:
    """An assistant turn translated to OpenAI, answered as such by a node, comes back as the
    same text and the same tool calls (text blocks joined in one)."""
    chat = tr.messages_to_chat(request_with(content))
    said = chat["messages"][-1]
    finish = "tool_calls" if "tool_calls" in said else "stop"
    answer = {"id": "chatcmpl-9", "choices": [{"index": 0, "message": said,
                                               "finish_reason": finish}]}
    back = tr.chat_to_message(answer, MODEL, "msg_1")
    text = "".join(block["text"] for block in content if block["type"] == "text")
    expected = ([{"type": "text", "text": text}] if text else []) + [
        block for block in content if block["type"] == "tool_use"
    ]
    assert back["content"] == expected
    has_tools = any(block["type"] == "tool_use" for block in content)
    assert back["stop_reason"] == ("tool_use" if has_tools else "end_turn")


@given(st.lists(texts, min_size=1, max_size=3), st.booleans())
def test_message_events_accumulate_to_the_message(chunks: list[str], tool: bool) -> None:
    content: list[dict[str, Any]] = [{"type": "text", "text": "".join(chunks)}]
    if tool:
        content.append({"type": "tool_use", "id": "t1", "name": "f", "input": {"a": chunks}})
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
               "content": content, "stop_reason": "end_turn", "stop_sequence": None,
               "usage": {"input_tokens": 1, "output_tokens": 2}}
    assert accumulate(tr.message_events(message)) == message


def test_request_translation() -> None:
    body = {
        "model": MODEL, "max_tokens": 100, "stream": True,
        "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        "stop_sequences": ["END"], "temperature": 0.5, "top_p": 0.9, "top_k": 40,
        "metadata": {"user_id": "u1"}, "thinking": {"type": "enabled", "budget_tokens": 9},
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "see"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                             "data": "QUJD"}},
                {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "tool_use", "id": "c1", "name": "f", "input": {"q": 1}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "c1", "is_error": True,
                 "content": [{"type": "text", "text": "boom"},
                             {"type": "image", "source": {"type": "url", "url": "u"}}]},
                {"type": "text", "text": "and?"},
            ]},
        ],
    }
    tr.validate_request(body)
    assert tr.messages_to_chat(body) == {
        "model": MODEL, "max_tokens": 100, "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["END"], "temperature": 0.5, "top_p": 0.9, "top_k": 40, "user": "u1",
        "tool_choice": "required", "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {"name": "f",
                                                    "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "system", "content": "a\nb"},
            {"role": "user", "content": [
                {"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
            ]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": '{"q":1}'}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "Error: boom"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "u"}},
                {"type": "text", "text": "and?"},
            ]},
        ],
    }


@pytest.mark.parametrize("choice, wanted", [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
])
def test_tool_choice(choice: dict[str, Any], wanted: Any) -> None:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
            "tool_choice": choice}
    assert tr.messages_to_chat(body)["tool_choice"] == wanted


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": MODEL, "max_tokens": True, "messages": [{"role": "user", "content": "x"}]},
     "max_tokens"),
    ({"model": "", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": MODEL, "max_tokens": 1, "messages": "x"}, "messages"),
    ({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": 3}]},
     "messages.0.content"),
    ({"model": MODEL, "max_tokens": 1, "stream": "yes",
      "messages": [{"role": "user", "content": "x"}]}, "stream"),
])
def test_invalid_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        tr.validate_request(body)
    assert caught.value.param == param


@pytest.mark.parametrize("content", [
    [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
    [{"type": "document", "source": {"type": "base64", "data": "x"}}],
    [{"type": "tool_result", "content": "x"}],
    ["just a string"],
])
def test_untranslatable_content_is_a_400(content: list[Any]) -> None:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": content}]}
    with pytest.raises(BadRequest):
        tr.messages_to_chat(body)


def test_server_tools_are_refused() -> None:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    with pytest.raises(BadRequest, match="web_search_20250305"):
        tr.messages_to_chat(body)


def test_answer_translation_details() -> None:
    answer = {
        "choices": [{"message": {"content": "hi", "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": "not json"}},
            {"id": "d", "function": {"name": "g", "arguments": ""}},
        ]}, "finish_reason": "stop", "stop_reason": None}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3,
                  "prompt_tokens_details": {"cached_tokens": 4}},
    }
    message = tr.chat_to_message(answer, MODEL, "msg_1")
    assert message["content"] == [
        {"type": "text", "text": "hi"},
        {"type": "tool_use", "id": "c", "name": "f", "input": {"_raw_arguments": "not json"}},
        {"type": "tool_use", "id": "d", "name": "g", "input": {}},
    ]
    assert message["stop_reason"] == "tool_use"  # the node said stop after calling tools
    assert message["usage"] == {"input_tokens": 6, "output_tokens": 3,
                                "cache_read_input_tokens": 4}


@pytest.mark.parametrize("finish, matched, wanted", [
    ("stop", None, ("end_turn", None)),
    ("stop", "END", ("stop_sequence", "END")),
    ("stop", "OTHER", ("end_turn", None)),
    ("length", None, ("max_tokens", None)),
    ("tool_calls", None, ("tool_use", None)),
    ("content_filter", None, ("refusal", None)),
    (None, None, ("end_turn", None)),
])
def test_stop_reasons(finish: Any, matched: Any, wanted: tuple[str, str | None]) -> None:
    assert tr.stop_reason(finish, matched, ("END",)) == wanted


def test_stream_stop_sequence_and_no_usage() -> None:
    """vLLM says which stop string it hit; without usage, output tokens are the deltas."""
    raw = (b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
           b'data: {"choices":[{"index":0,"delta":{"content":"b"}}]}\n\n'
           b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop",'
           b'"stop_reason":"END"}]}\n\ndata: [DONE]\n\n')
    message = accumulate(translate([raw], ("END",)))
    assert message["stop_reason"] == "stop_sequence" and message["stop_sequence"] == "END"
    assert message["usage"] == {"input_tokens": 7, "output_tokens": 2}
    assert message["content"] == [{"type": "text", "text": "ab"}]


def test_stream_ended_without_done_is_closed() -> None:
    raw = b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"length"}]}'
    message = accumulate(translate([raw]))  # no blank line, no [DONE]: close() ends it
    assert message["stop_reason"] == "max_tokens" and message["content"][0]["text"] == "a"


def test_stream_node_error_event_and_lb_error() -> None:
    stream = tr.ChatToMessagesStream(MODEL, "msg_x")
    out = stream.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
                      b'data: {"error":{"message":"oom"}}\n\ndata: [DONE]\n\n')
    events = parse_events(out)
    assert events[-1] == ("error", {"type": "error",
                                    "error": {"type": "api_error", "message": "oom"}})
    assert stream.done and stream.close() == b""
    assert stream.error(NoHealthyNode("x")) == b""  # nothing after the end
    fresh = tr.ChatToMessagesStream(MODEL, "msg_y")
    fresh.feed(b'data: {"choices":[]}\n\n')
    assert parse_events(fresh.error(NoHealthyNode("gone"))) == [
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "gone"}})
    ]


@pytest.mark.parametrize("status, wanted", [
    (400, "invalid_request_error"), (401, "authentication_error"), (402, "billing_error"),
    (403, "permission_error"), (404, "not_found_error"), (413, "invalid_request_error"),
    (415, "invalid_request_error"), (422, "invalid_request_error"),
    (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"),
    (503, "overloaded_error"), (504, "timeout_error"), (529, "overloaded_error"),
])
def test_error_types_by_status(status: int, wanted: str) -> None:
    assert tr.error_type(status) == wanted
    payload = tr.lb_error_payload(LBError("m", status=status))
    assert payload == {"type": "error", "error": {"type": wanted, "message": "m"}}


def test_model_not_found_payload_and_node_messages() -> None:
    assert tr.lb_error_payload(ModelNotFound("no such model"))["error"]["type"] == (
        "not_found_error"
    )
    assert tr.node_error_message(b'{"error":{"message":"bad"}}') == "bad"
    assert tr.node_error_message(b'{"detail":"nope"}') == "nope"
    assert tr.node_error_message(b"plain text") == "plain text"
    assert tr.node_error_message(b"[1]") == "The node answered an error"


def test_estimate_tokens_grows_with_the_prompt() -> None:
    short = {"messages": [{"role": "user", "content": "x"}]}
    long = {"messages": [{"role": "user", "content": "x" * 4000}]}
    assert 0 < tr.estimate_tokens(short) < tr.estimate_tokens(long)
    assert 1000 <= tr.estimate_tokens(long) <= 1020


def test_whole_tool_calls_without_index() -> None:
    """Servers that send each call whole in one delta may leave out `index`."""
    calls = [{"id": "a", "function": {"name": "f", "arguments": "{}"}},
             {"id": "b", "function": {"name": "g", "arguments": '{"x":1}'}}]
    raw = (b'data: ' + orjson.dumps({"choices": [{"index": 0, "delta": {"tool_calls": calls},
                                                  "finish_reason": "tool_calls"}]})
           + b"\n\ndata: [DONE]\n\n")
    message = accumulate(translate([raw]))
    assert [(b["id"], b["name"], b["input"]) for b in message["content"]] == [
        ("a", "f", {}), ("b", "g", {"x": 1})]
    assert message["stop_reason"] == "tool_use"
