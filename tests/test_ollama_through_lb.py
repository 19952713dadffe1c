"""The official openai SDK through lb to a node spoken to in Ollama's native API (the mock's
`/api/*`), over real sockets: chat, streams, tools with streamed arguments, embeddings,
completions and errors, each parsed by the SDK's own types."""

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

MODELS = ("llama3:8b", "nomic-embed-text")
CHAT: list[Any] = [{"role": "user", "content": "say hello to me"}]
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
    }},
}}


@asynccontextmanager
async def ollama_behind_lb(**mock: Any) -> AsyncIterator[tuple[openai.AsyncOpenAI, RunningMock]]:
    async with trio.open_nursery() as nursery:
        node = await start_mock(nursery, models=MODELS, **mock)
        lb = await start_lb(nursery, [], configs=(NodeConfig(node.url, dialect="ollama"),))
        yield sdk(lb), node
        nursery.cancel_scope.cancel()


async def paths(node: RunningMock) -> list[str]:
    return [r["path"] for r in await node.requests() if r["method"] == "POST"]


async def test_chat_and_stream() -> None:
    with trio.fail_after(20):
        async with ollama_behind_lb(tokens=5) as (client, node):
            answer = await client.chat.completions.create(
                model="llama3:8b", messages=CHAT, max_tokens=3, temperature=0.2)
            assert answer.choices[0].message.content == "Lorem ipsum dolor"
            assert answer.choices[0].finish_reason == "length"
            assert answer.usage is not None
            assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (4, 3)
            sent = (await node.requests())[-1]
            assert sent["path"] == "/api/chat"
            assert sent["body"]["options"] == {"temperature": 0.2, "num_predict": 3}
            assert sent["body"]["stream"] is False

            stream = await client.chat.completions.create(
                model="llama3:8b", messages=CHAT, stream=True,
                stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            assert len({c.id for c in chunks}) == 1
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "Lorem ipsum dolor sit amet"
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
            assert set(await paths(node)) == {"/api/chat"}


async def test_tools_with_streamed_arguments() -> None:
    with trio.fail_after(20):
        async with ollama_behind_lb() as (client, _):
            answer = await client.chat.completions.create(
                model="llama3:8b", messages=CHAT, tools=[WEATHER])
            call = (answer.choices[0].message.tool_calls or [])[0]
            assert answer.choices[0].finish_reason == "tool_calls"
            assert isinstance(call, openai.types.chat.ChatCompletionMessageFunctionToolCall)
            assert orjson.loads(call.function.arguments) == {"city": "lorem", "days": 1}

            # The SDK's stream helper accumulates the argument deltas and parses the result.
            async with client.chat.completions.stream(
                model="llama3:8b", messages=CHAT, tools=[WEATHER],
            ) as stream:
                argument_deltas = [e async for e in stream
                                   if e.type == "tool_calls.function.arguments.delta"]
                final = await stream.get_final_completion()
            assert argument_deltas
            calls = final.choices[0].message.tool_calls or []
            assert [c.function.name for c in calls] == ["get_weather"]
            assert orjson.loads(calls[0].function.arguments) == {"city": "lorem", "days": 1}
            assert final.choices[0].finish_reason == "tool_calls"

            # The tool's result goes back; the node answers in text.
            followup = await client.chat.completions.create(model="llama3:8b", tools=[WEATHER],
                messages=[*CHAT, answer.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
            assert followup.choices[0].message.content
            assert followup.choices[0].finish_reason == "stop"


async def test_embeddings_and_completions() -> None:
    with trio.fail_after(20):
        async with ollama_behind_lb(tokens=2, embedding_dim=16) as (client, node):
            vectors = await client.embeddings.create(model="nomic-embed-text",
                                                     input=["a b", "c"])
            assert [len(d.embedding) for d in vectors.data] == [16, 16]
            assert vectors.usage.prompt_tokens == 3
            text = await client.completions.create(model="llama3:8b", prompt="once upon")
            assert text.choices[0].text == "Lorem ipsum"
            assert await paths(node) == ["/api/embed", "/api/generate"]


async def test_errors_in_openai_shape() -> None:
    with trio.fail_after(20):
        async with ollama_behind_lb() as (client, node):
            with pytest.raises(openai.BadRequestError, match="only base64 images"):
                await client.chat.completions.create(model="llama3:8b", messages=[
                    {"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "https://x/cat.png"}}]}])
            assert await paths(node) == []  # refused before any node was called

            with pytest.raises(openai.BadRequestError, match="Injected fault"):
                await client.chat.completions.create(
                    model="llama3:8b", messages=CHAT,
                    extra_headers={"x-mock-fault": "status=400"})

            # An error line after two good ones: their tokens, then OpenAI's error event.
            stream = await client.chat.completions.create(
                model="llama3:8b", messages=CHAT, stream=True,
                extra_headers={"x-mock-stream-error": "2"})
            seen = []
            with pytest.raises(openai.APIError, match="mock stream error after 2 lines"):
                async for chunk in stream:
                    seen.append(chunk.choices[0].delta.content if chunk.choices else None)
            assert seen == ["", "Lorem", " ipsum"]

            # An error line first: nothing went out yet, so it is a failed attempt (502).
            with pytest.raises(openai.InternalServerError, match="mock stream error after 0"):
                await client.chat.completions.create(
                    model="llama3:8b", messages=CHAT, stream=True,
                    extra_headers={"x-mock-stream-error": "0"})
