"""The mock node's Ollama native API over real sockets, driven by the official `ollama` client
(its types parse the answers as they parse a real Ollama's) and by httpx for the raw wire."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import ollama
import orjson
import pytest
import trio

from lb.testing import MockNode

CHAT = [{"role": "user", "content": "say hello to me"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    }},
}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}


@asynccontextmanager
async def running(**options: Any) -> AsyncIterator[tuple[MockNode, str]]:
    node = MockNode(**{"models": ("llama3:8b", "all-minilm"), **options})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(node.serve, "127.0.0.1", 0)
        yield node, f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


def client(base: str, **headers: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=base, headers=headers)


async def test_chat_json_and_stream() -> None:
    with trio.fail_after(10):
        async with running(tokens=4) as (node, base):
            answer = await client(base).chat(model="llama3:8b", messages=CHAT)
            assert answer.message.role == "assistant"
            assert answer.message.content == "Lorem ipsum dolor sit"
            assert answer.done and answer.done_reason == "stop"
            assert (answer.prompt_eval_count, answer.eval_count) == (4, 4)
            assert answer.total_duration and answer.created_at

            parts = [p async for p in await client(base).chat(
                model="llama3:8b", messages=CHAT, stream=True)]
            assert [p.message.content for p in parts] == [
                "Lorem", " ipsum", " dolor", " sit", "",
            ]
            assert [p.done for p in parts] == [False] * 4 + [True]
            assert parts[-1].done_reason == "stop" and parts[-1].eval_count == 4
            assert node.stats.by_path["/api/chat"] == 2 and node.stats.completed == 2


async def test_stream_is_ndjson_by_default() -> None:
    with trio.fail_after(10):
        async with running(tokens=2) as (_, base), httpx.AsyncClient() as http:
            # No "stream" field: Ollama streams.
            response = await http.post(f"{base}/api/chat",
                                       json={"model": "llama3:8b", "messages": CHAT})
            assert response.headers["content-type"] == "application/x-ndjson"
            lines = [orjson.loads(line) for line in response.content.splitlines()]
            assert response.content.endswith(b"\n") and len(lines) == 3
            assert lines[-1]["done"] is True and "message" in lines[-1]
            response = await http.post(f"{base}/api/chat", json={
                "model": "llama3:8b", "messages": CHAT, "stream": False})
            assert response.headers["content-type"] == "application/json"
            assert orjson.loads(response.content)["message"]["content"] == "Lorem ipsum"


async def test_num_predict_cuts_the_answer() -> None:
    with trio.fail_after(10):
        async with running(tokens=8) as (_, base):
            answer = await client(base).chat(
                model="llama3:8b", messages=CHAT, options={"num_predict": 2})
            assert answer.message.content == "Lorem ipsum" and answer.done_reason == "length"
            answer = await client(base).chat(
                model="llama3:8b", messages=CHAT, options={"num_predict": -1})
            assert answer.eval_count == 8 and answer.done_reason == "stop"


async def test_tool_calls() -> None:
    with trio.fail_after(10):
        async with running() as (_, base):
            answer = await client(base).chat(model="llama3:8b", messages=CHAT,
                                             tools=[WEATHER, CLOCK])
            calls = answer.message.tool_calls or []
            assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
                ("get_weather", {"city": "lorem", "days": 1, "unit": "celsius"}),
            ]
            assert answer.message.content == ""

            two = client(base, **{"x-mock-tool-calls": "2"})
            parts = [p async for p in await two.chat(
                model="llama3:8b", messages=CHAT, tools=[WEATHER, CLOCK], stream=True)]
            assert [[c.function.name for c in p.message.tool_calls or []] for p in parts] == [
                ["get_weather", "now"], [],
            ]
            assert parts[-1].done

            none = client(base, **{"x-mock-tool-calls": "0"})
            answer = await none.chat(model="llama3:8b", messages=CHAT, tools=[WEATHER])
            assert not answer.message.tool_calls and answer.message.content

            # A tool result as the last message: the node answers in text.
            answer = await client(base).chat(model="llama3:8b", tools=[WEATHER], messages=[
                *CHAT,
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
            ])
            assert not answer.message.tool_calls and answer.message.content


async def test_generate_and_embed() -> None:
    with trio.fail_after(10):
        async with running(tokens=3, embedding_dim=32) as (_, base):
            answer = await client(base).generate(model="llama3:8b", prompt="once upon a time")
            assert answer.response == "Lorem ipsum dolor" and answer.done
            assert answer.prompt_eval_count == 4 and answer.eval_count == 3
            parts = [p async for p in await client(base).generate(
                model="llama3:8b", prompt="x", stream=True)]
            assert "".join(p.response or "" for p in parts) == "Lorem ipsum dolor"
            assert parts[-1].done and parts[-1].done_reason == "stop"

            one = await client(base).embed(model="all-minilm", input="why is the sky blue")
            assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 32
            assert one.prompt_eval_count == 5
            two = await client(base).embed(model="all-minilm", input=["a b", "c"], dimensions=8)
            assert [len(v) for v in two.embeddings] == [8, 8]


async def test_empty_messages_load_the_model() -> None:
    with trio.fail_after(10):
        async with running() as (_, base):
            answer = await client(base).chat(model="llama3:8b", messages=[])
            assert answer.done_reason == "load" and answer.message.content == ""
            loaded = await client(base).generate(model="llama3:8b")
            assert loaded.done_reason == "load" and loaded.response == ""


async def test_errors_in_ollama_shape() -> None:
    with trio.fail_after(10):
        async with running() as (node, base):
            with pytest.raises(ollama.ResponseError) as caught:
                await client(base).chat(model="llama9", messages=CHAT)
            assert caught.value.status_code == 404
            assert caught.value.error == "model 'llama9' not found"

            faulty = client(base, **{"x-mock-fault": "status=503,retry-after=2"})
            with pytest.raises(ollama.ResponseError) as caught:
                await faulty.generate(model="llama3:8b", prompt="x")
            assert caught.value.status_code == 503
            assert caught.value.error.startswith("Injected fault: status 503")

            broken = client(base, **{"x-mock-stream-error": "1"})
            seen = []
            with pytest.raises(ollama.ResponseError, match="mock stream error after 1 lines"):
                async for part in await broken.chat(model="llama3:8b", messages=CHAT,
                                                    stream=True):
                    seen.append(part.message.content)
            assert seen == ["Lorem"]
            assert node.stats.errors == 2  # 404 and 503; the mid-stream error went out under a 200


@pytest.mark.parametrize(("body", "message"), [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     "cannot unmarshal array"),
    ({"messages": [{"role": "user", "content": "hi", "images": ["not base64!"]}]},
     "illegal base64"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{\"a\": 1}"}}]}]}, "arguments"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "invalid role"),
    ({"messages": CHAT, "stream": "yes"}, "stream"),
    ({"messages": CHAT, "options": [1]}, "options"),
])
async def test_refuses_what_ollama_refuses(body: dict[str, Any], message: str) -> None:
    """A translation bug (OpenAI shapes sent to Ollama) shows as the 400 Ollama would give."""
    with trio.fail_after(10):
        async with running() as (_, base), httpx.AsyncClient() as http:
            response = await http.post(f"{base}/api/chat",
                                       json={"model": "llama3:8b", **body})
            assert response.status_code == 400
            assert message in response.json()["error"]


async def test_drop_after_cuts_the_ndjson_stream() -> None:
    with trio.fail_after(10):
        async with running(tokens=5, fault="drop-after=2") as (node, base):
            with pytest.raises(httpx.RemoteProtocolError):
                async for _ in await client(base).chat(
                    model="llama3:8b", messages=CHAT, stream=True):
                    pass
            await trio.testing.wait_all_tasks_blocked()
            assert node.stats.dropped == 1
