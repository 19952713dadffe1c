"""The official openai SDK through lb to a node spoken to in Anthropic's Messages API (the mock
playing Anthropic), over real sockets: chat, streams, tools with streamed arguments, the tool
loop and errors, each parsed by the SDK's own types."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import orjson
import pytest
import trio
from harness import RunningMock, sdk, start_lb, start_mock

from lb.config import NodeConfig

KEY = "sk-ant-lb"
CHAT: list[Any] = [{"role": "system", "content": "be brief"},
    {"role": "user", "content": "say hello to me"}]
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
    }},
}}


@asynccontextmanager
async def anthropic_behind_lb(
    key: str = KEY, **mock: Any,
) -> AsyncIterator[tuple[openai.AsyncOpenAI, RunningMock]]:
    async with trio.open_nursery() as nursery:
        node = await start_mock(nursery, dialect="anthropic", models=("claude-test",),
            api_key=KEY, **mock)
        config = NodeConfig(node.url, dialect="anthropic", api_key=key, models=("claude-test",))
        lb = await start_lb(nursery, [], configs=(config,))
        yield sdk(lb), node
        nursery.cancel_scope.cancel()


async def test_chat_and_stream() -> None:
    with trio.fail_after(20):
        async with anthropic_behind_lb(tokens=5) as (client, node):
            answer = await client.chat.completions.create(
                model="claude-test", messages=CHAT, max_tokens=3, temperature=1.5)
            assert answer.choices[0].message.content == "Lorem ipsum dolor"
            assert answer.choices[0].finish_reason == "length"
            assert answer.usage is not None
            assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (6, 3)
            sent = (await node.requests())[-1]
            assert sent["path"] == "/v1/messages"
            assert sent["headers"]["x-api-key"] == KEY
            assert "authorization" not in sent["headers"]  # the client's key stays with lb
            assert sent["body"]["system"] == "be brief"
            assert sent["body"]["temperature"] == 1 and sent["body"]["max_tokens"] == 3

            stream = await client.chat.completions.create(
                model="claude-test", messages=CHAT, stream=True,
                stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            assert len({c.id for c in chunks}) == 1
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "Lorem ipsum dolor sit amet"
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


async def test_tools_with_streamed_arguments_and_the_tool_loop() -> None:
    ask: list[Any] = [{"role": "user", "content": "call get_weather"}]
    with trio.fail_after(20):
        async with anthropic_behind_lb(tokens=2) as (client, _):
            async with client.chat.completions.stream(
                model="claude-test", messages=ask, tools=[WEATHER],
            ) as stream:
                async for _event in stream:
                    pass
                final = await stream.get_final_completion()
            choice = final.choices[0]
            assert choice.finish_reason == "tool_calls"
            assert choice.message.content == "Calling get_weather."
            [call] = choice.message.tool_calls or []
            assert isinstance(call, openai.types.chat.ParsedFunctionToolCall)
            assert orjson.loads(call.function.arguments) == {"city": "lorem", "days": 1}

            answer = await client.chat.completions.create(model="claude-test", tools=[WEATHER],
                messages=[*ask, choice.message.model_dump(exclude_none=True,
                    include={"role", "content", "tool_calls"}),
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
            assert answer.choices[0].message.content == "Lorem ipsum"
            assert answer.choices[0].finish_reason == "stop"


async def test_errors() -> None:
    with trio.fail_after(20):
        async with anthropic_behind_lb() as (client, _):
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(model="claude-test", messages=CHAT, n=2)
            assert bad.value.body["param"] == "n"  # type: ignore[index]
            with pytest.raises(openai.APIStatusError) as overloaded:
                await client.chat.completions.create(model="claude-test", messages=CHAT,
                    extra_headers={"x-mock-fault": "status=529"})
            assert overloaded.value.status_code == 502  # every attempt failed (one node)
            assert "HTTP 529: Injected fault" in overloaded.value.message
            stream = await client.chat.completions.create(model="claude-test", messages=CHAT,
                stream=True, extra_headers={"x-mock-fault": "error-after=4"})
            with pytest.raises(openai.APIError, match="Overloaded"):
                async for _chunk in stream:
                    pass
        async with anthropic_behind_lb(key="wrong") as (client, _):
            with pytest.raises(openai.APIStatusError) as refused:
                await client.chat.completions.create(model="claude-test", messages=CHAT)
            assert "lb's credential" in refused.value.message
