"""The two Anthropic translators composed: an OpenAI chat request turned into Anthropic's
(the node dialect) and back into OpenAI's (the client dialect) keeps its meaning — every turn's
role and text, the system prompt, sampling fields and tool calls with their results."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from lb.api.anthropic_translate import messages_to_chat, validate_request
from lb.upstream.dialects.anthropic import AnthropicDialect

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
               max_size=40).filter(str.strip)


@st.composite
def chats(draw: st.DrawFn) -> dict[str, Any]:
    """A chat that alternates user and assistant turns (as Anthropic requires), ending with
    the user's, maybe with a system prompt and one tool call answered by its result."""
    turns = draw(st.integers(0, 3))
    messages: list[dict[str, Any]] = []
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(text)},
                     {"role": "assistant", "content": draw(text)}]
    if draw(st.booleans()):
        arguments = orjson.dumps({"city": draw(text)}).decode()
        messages += [
            {"role": "user", "content": draw(text)},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": draw(text)},
        ]
    else:
        messages.append({"role": "user", "content": draw(text)})
    if draw(st.booleans()):
        messages.insert(0, {"role": "system", "content": draw(text)})
    body: dict[str, Any] = {
        "model": "m", "messages": messages, "max_tokens": draw(st.integers(1, 4096)),
        "temperature": draw(st.floats(0, 1)), "stop": draw(st.lists(text, max_size=2)),
    }
    return body


def meaning(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What a model is asked: each turn's role, text, tool calls (name, arguments) and tool
    results (call id, text)."""
    seen: list[tuple[Any, ...]] = []
    for message in body["messages"]:
        calls = tuple(
            (call["function"]["name"], orjson.loads(call["function"]["arguments"]))
            for call in message.get("tool_calls") or ()
        )
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        seen.append((message["role"], content or None, calls, message.get("tool_call_id")))
    return seen


@given(chats())
def test_openai_to_anthropic_to_openai_keeps_the_meaning(chat: dict[str, Any]) -> None:
    anthropic_body = orjson.loads(AnthropicDialect().encode("chat", chat, "m"))
    validate_request(anthropic_body)
    back = messages_to_chat(anthropic_body)
    assert meaning(back) == meaning(chat)
    assert back["max_tokens"] == chat["max_tokens"]
    assert back["temperature"] == chat["temperature"]
    assert list(back.get("stop") or []) == chat["stop"]
