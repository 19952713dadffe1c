"""Both official SDKs through lb to nodes of all three dialects: chat, a stream, tools with
streamed arguments and an error, each parsed by the SDK's own types. (Each pair's details are
in test_anthropic_in.py, test_anthropic_through_lb.py and test_ollama_through_lb.py; this is
the whole matrix at once.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import openai
import pytest
import trio

from lb.config import NodeConfig
from tests.harness import Running, anthropic_sdk, sdk, start_lb, start_mock

KEY = "node-key"
ASK = "call get_weather for Paris"
OPENAI_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string"}}},
}}
ANTHROPIC_TOOL: Any = {
    "name": "get_weather", "description": "Weather in a city",
    "input_schema": OPENAI_TOOL["function"]["parameters"],
}
DIALECTS = ("openai", "anthropic", "ollama")


@asynccontextmanager
async def lb_before(dialect: str) -> AsyncIterator[Running]:
    async with trio.open_nursery() as nursery:
        if dialect == "anthropic":
            node = await start_mock(nursery, dialect="anthropic", models=("m",), api_key=KEY)
        else:
            node = await start_mock(nursery, models=("m",), tool_calls=True)
        config = NodeConfig(node.url, dialect=dialect, models=("m",),
                            api_key=KEY if dialect == "anthropic" else "")
        yield await start_lb(nursery, [], configs=(config,))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_the_openai_sdk(dialect: str) -> None:
    with trio.fail_after(30):
        async with lb_before(dialect) as lb:
            client = sdk(lb)
            messages: Any = [{"role": "user", "content": "hello there"}]
            answer = await client.chat.completions.create(model="m", messages=messages)
            assert answer.choices[0].message.content
            assert answer.choices[0].finish_reason in ("stop", "length")

            chunks = [chunk async for chunk in await client.chat.completions.create(
                model="m", messages=messages, stream=True,
                stream_options={"include_usage": True},
            )]
            assert len({chunk.id for chunk in chunks}) == 1
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

            arguments = ""
            async with client.chat.completions.stream(
                model="m", messages=[{"role": "user", "content": ASK}], tools=[OPENAI_TOOL],
            ) as events:
                async for event in events:
                    if event.type == "tool_calls.function.arguments.delta":
                        arguments += event.arguments_delta
                final = await events.get_final_completion()
            (call,) = final.choices[0].message.tool_calls or []
            assert call.type == "function" and call.function.name == "get_weather"
            assert json.loads(call.function.arguments) == json.loads(arguments)
            assert "city" in json.loads(arguments)

            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="no-such-model", messages=messages)


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_the_anthropic_sdk(dialect: str) -> None:
    with trio.fail_after(30):
        async with lb_before(dialect) as lb:
            client = anthropic_sdk(lb)
            messages: Any = [{"role": "user", "content": "hello there"}]
            message = await client.messages.create(model="m", max_tokens=64, messages=messages)
            assert message.content[0].type == "text" and message.content[0].text
            assert message.stop_reason in ("end_turn", "max_tokens")

            async with client.messages.stream(
                model="m", max_tokens=64, messages=messages
            ) as stream:
                text = "".join([piece async for piece in stream.text_stream])
                final = await stream.get_final_message()
            assert text and final.content[0].type == "text" and final.content[0].text == text
            assert final.usage.output_tokens > 0

            partial = ""
            async with client.messages.stream(
                model="m", max_tokens=256, tools=[ANTHROPIC_TOOL],
                messages=[{"role": "user", "content": ASK}],
            ) as stream:
                async for event in stream:
                    if event.type == "content_block_delta" and \
                            event.delta.type == "input_json_delta":
                        partial += event.delta.partial_json
                final = await stream.get_final_message()
            (use,) = [block for block in final.content if block.type == "tool_use"]
            assert use.name == "get_weather" and "city" in use.input
            assert json.loads(partial) == use.input
            assert final.stop_reason == "tool_use"

            with pytest.raises(anthropic.NotFoundError):
                await client.messages.create(model="no-such-model", max_tokens=8,
                                             messages=messages)
