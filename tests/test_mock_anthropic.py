"""The mock node playing Anthropic's Messages API, driven by the official anthropic SDK over
real sockets (and by httpx where the SDK would refuse to send a bad request)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
import trio
from click.testing import CliRunner
from harness import RunningMock, anthropic_sdk, start_mock

from lb.cli import main as cli_main
from lb.testing import MockNode
from lb.testing.tools import example

KEY = "sk-ant-test"
USER = [{"role": "user", "content": "hello there"}]
WEATHER: Any = {"name": "get_weather", "description": "Weather of a city", "input_schema": {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer"}},
    "required": ["city"],
}}
TIME: Any = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}


@asynccontextmanager
async def anthropic_node(**options: Any) -> AsyncIterator[RunningMock]:
    options = {"dialect": "anthropic", "models": ("claude-test",), "api_key": KEY, **options}
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            yield await start_mock(nursery, **options)
            nursery.cancel_scope.cancel()


async def raw_events(node: RunningMock, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """(event name, data) of a streamed answer, as sent."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(f"{node.url}/v1/messages", json={**body, "stream": True},
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    for event in response.content.split(b"\n\n")[:-1]:
        name, data = event.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        payload = orjson.loads(data[6:])
        assert payload["type"] == name[7:].decode()
        out.append((payload["type"], payload))
    return out


async def test_json_answer() -> None:
    async with anthropic_node(tokens=4) as node:
        message = await anthropic_sdk(node, KEY).messages.create(
            model="claude-test", max_tokens=100, system="be brief", messages=USER,
        )
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "claude-test" and message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Lorem ipsum dolor sit"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (4, 4)


async def test_stream_has_anthropic_event_sequence() -> None:
    async with anthropic_node(tokens=3) as node:
        events = await raw_events(node, {"model": "claude-test", "max_tokens": 50,
            "messages": USER})
        async with anthropic_sdk(node, KEY).messages.stream(
            model="claude-test", max_tokens=50, messages=USER,
        ) as stream:
            texts = [event.text async for event in stream if event.type == "text"]
            final = await stream.get_final_message()
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta",
        "content_block_delta", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"output_tokens": 3}
    assert texts == ["Lorem", " ipsum", " dolor"]
    assert final.content[0].text == "Lorem ipsum dolor"  # type: ignore[union-attr]
    assert final.usage.output_tokens == 3


async def test_max_tokens_and_stop_sequences_cut_the_answer() -> None:
    async with anthropic_node(tokens=8) as node:
        client = anthropic_sdk(node, KEY)
        short = await client.messages.create(model="claude-test", max_tokens=2, messages=USER)
        stopped = await client.messages.create(
            model="claude-test", max_tokens=100, messages=USER, stop_sequences=["zzz", "sit a"],
        )
    assert short.content[0].text == "Lorem ipsum"  # type: ignore[union-attr]
    assert short.stop_reason == "max_tokens"
    assert stopped.content[0].text == "Lorem ipsum dolor "  # type: ignore[union-attr]
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "sit a")


async def test_tool_call_streamed_as_input_json_deltas() -> None:
    async with anthropic_node() as node:
        events = await raw_events(node, {"model": "claude-test", "max_tokens": 50,
            "tools": [WEATHER], "messages": [{"role": "user", "content": "call get_weather"}]})
        async with anthropic_sdk(node, KEY).messages.stream(
            model="claude-test", max_tokens=50, tools=[WEATHER, TIME],
            messages=[{"role": "user", "content": "call get_weather please"}],
        ) as stream:
            partials = [e.partial_json async for e in stream if e.type == "input_json"]
            final = await stream.get_final_message()
    expected = {"city": "lorem", "unit": "C", "days": 1}
    fragments = [e["delta"]["partial_json"] for name, e in events
        if name == "content_block_delta" and e["delta"]["type"] == "input_json_delta"]
    assert len(fragments) > 1 and orjson.loads("".join(fragments)) == expected
    assert "".join(partials) == "".join(fragments)
    assert final.stop_reason == "tool_use"
    text, call = final.content
    assert text.type == "text" and text.text == "Calling get_weather."
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == expected
    assert call.id.startswith("toolu_")


async def test_which_tools_are_called() -> None:
    async with anthropic_node() as node:
        client = anthropic_sdk(node, KEY)

        async def called(text: str, **options: Any) -> list[str]:
            message = await client.messages.create(
                model="claude-test", max_tokens=50, tools=[WEATHER, TIME],
                messages=[{"role": "user", "content": text}], **options,
            )
            return [b.name for b in message.content if b.type == "tool_use"]

        assert await called("call get_time and call get_weather") == ["get_time", "get_weather"]
        assert await called("call get_time, call get_weather", tool_choice={
            "type": "auto", "disable_parallel_tool_use": True}) == ["get_time"]
        assert await called("call nothing") == []
        assert await called("call get_time", tool_choice={"type": "none"}) == []
        assert await called("hello", tool_choice={"type": "any"}) == ["get_weather"]
        assert await called("hello", tool_choice={"type": "tool", "name": "get_time"}) == [
            "get_time"]


async def test_consecutive_turns_merge_and_system_messages_are_accepted() -> None:
    async with anthropic_node() as node, httpx.AsyncClient() as http:
        response = await http.post(f"{node.url}/v1/messages", json={
            "model": "claude-test", "max_tokens": 5, "messages": [
                {"role": "system", "content": "be brief"}, *USER, *USER,
                {"role": "assistant", "content": "ok"}, {"role": "assistant", "content": ""},
            ]}, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["input_tokens"] == 7


async def test_tool_loop_and_tool_result_checks() -> None:
    async with anthropic_node(tokens=2) as node:
        client = anthropic_sdk(node, KEY)
        first = await client.messages.create(
            model="claude-test", max_tokens=50, tools=[WEATHER],
            messages=[{"role": "user", "content": "call get_weather"}],
        )
        call = first.content[-1]
        assert call.type == "tool_use"
        history: list[Any] = [
            {"role": "user", "content": "call get_weather"},
            {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                for b in first.content]},
        ]
        answered = await client.messages.create(
            model="claude-test", max_tokens=50, tools=[WEATHER], messages=[
                *history, {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
            ],
        )
        assert answered.stop_reason == "end_turn"
        assert answered.content[0].text == "Lorem ipsum"  # type: ignore[union-attr]
        with pytest.raises(anthropic.BadRequestError, match="without `tool_result`"):
            await client.messages.create(model="claude-test", max_tokens=50, tools=[WEATHER],
                messages=[*history, {"role": "user", "content": "what now?"}])
        with pytest.raises(anthropic.BadRequestError, match="unexpected `tool_use_id`"):
            await client.messages.create(model="claude-test", max_tokens=50, messages=[
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_x", "content": "?"}]},
            ])


@pytest.mark.parametrize(("body", "message"), [
    ({"messages": USER}, "max_tokens"),
    ({"max_tokens": 5, "messages": [{"role": "tool", "content": "x"}, *USER]}, "role"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": [{"type": "image"}]}]},
     "text only"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": ""}, {"role": "assistant",
        "content": "a"}, *USER]}, "non-empty"),
    ({"max_tokens": 5, "messages": USER, "temperature": 1.5}, "temperature"),
    ({"max_tokens": 5, "messages": USER, "tools": [{"name": "f"}]}, "input_schema"),
])
async def test_bad_requests_are_anthropic_400s(body: dict[str, Any], message: str) -> None:
    async with anthropic_node() as node, httpx.AsyncClient() as http:
        response = await http.post(f"{node.url}/v1/messages",
            json={"model": "claude-test", **body},
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
        missing = await http.post(f"{node.url}/v1/messages", headers={"x-api-key": KEY},
            json={"model": "claude-test", "max_tokens": 5, "messages": USER})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert message in error["error"]["message"]
    assert missing.status_code == 400 and "anthropic-version" in missing.text


async def test_errors_and_faults_in_anthropic_shape() -> None:
    async with anthropic_node() as node:
        client = anthropic_sdk(node, KEY)
        create = {"model": "claude-test", "max_tokens": 10, "messages": USER}
        with pytest.raises(anthropic.InternalServerError) as overloaded:
            await client.messages.create(**create, extra_headers={"x-mock-fault": "status=529"})
        assert overloaded.value.status_code == 529
        assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(**create,
                extra_headers={"x-mock-fault": "status=429,retry-after=7"})
        assert limited.value.response.headers["retry-after"] == "7"
        with pytest.raises(anthropic.AuthenticationError):
            await anthropic_sdk(node, "wrong").messages.create(**create)
        with pytest.raises(anthropic.AuthenticationError):
            await anthropic_sdk(node, "wrong").models.list()
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.create(**{**create, "model": "claude-nope"})
        assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        node.node.set_fault("status=500")
        with pytest.raises(anthropic.InternalServerError) as broken:
            await client.messages.create(**create)
        assert broken.value.body["error"]["type"] == "api_error"  # type: ignore[index]
        stats = await node.stats()
    assert stats["errors"] == 6 and stats["faults_injected"] == 3


async def test_error_event_and_dropped_connection_mid_stream() -> None:
    async with anthropic_node(tokens=5) as node:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(f"{node.url}/v1/messages", json={
                "model": "claude-test", "max_tokens": 50, "messages": USER, "stream": True,
            }, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01",
                "x-mock-fault": "error-after=4"})
        names = [e.split(b"\n")[0] for e in response.content.split(b"\n\n")[:-1]]
        assert names[-1] == b"event: error" and len(names) == 5
        assert b'"overloaded_error"' in response.content.split(b"\n\n")[-2]
        client = anthropic_sdk(node, KEY)
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            async with client.messages.stream(
                model="claude-test", max_tokens=50, messages=USER,
                extra_headers={"x-mock-fault": "error-after=4"},
            ) as stream:
                async for _ in stream:
                    pass
        # the SDK's own httpx fork raises its RemoteProtocolError
        with pytest.raises(Exception, match="incomplete chunked read"):
            async with client.messages.stream(
                model="claude-test", max_tokens=50, messages=USER,
                extra_headers={"x-mock-fault": "drop-after=3"},
            ) as stream:
                async for _ in stream:
                    pass
        stats = await node.stats()
    assert stats["dropped"] == 1


async def test_models_count_tokens_and_no_openai_endpoints() -> None:
    async with anthropic_node(models=("claude-a", "claude-b")) as node:
        client = anthropic_sdk(node, KEY)
        models = await client.models.list()
        counted = await client.messages.count_tokens(
            model="claude-a", system="one two", messages=USER,
        )
        async with httpx.AsyncClient() as http:
            chat = await http.post(f"{node.url}/v1/chat/completions", json={})
            health = await http.get(f"{node.url}/health")
            listing = (await http.get(f"{node.url}/v1/models",
                headers={"authorization": f"Bearer {KEY}"})).json()
    assert [m.id for m in models.data] == ["claude-a", "claude-b"]
    assert listing["has_more"] is False and listing["data"][0]["type"] == "model"
    assert counted.input_tokens == 4
    assert chat.status_code == 404 and health.status_code == 200


async def test_openai_mock_api_key_and_error_after() -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            node = await start_mock(nursery, api_key="sk-local", tokens=4)
            good = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="sk-local",
                max_retries=0)
            bad = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="nope", max_retries=0)
            chat: Any = {"model": "mock-model", "messages": USER}
            answer = await good.chat.completions.create(**chat)
            assert answer.choices[0].message.content == "Lorem ipsum dolor sit"
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(**chat)
            async with httpx.AsyncClient() as http:
                response = await http.post(f"{node.url}/v1/chat/completions",
                    json={**chat, "stream": True}, headers={
                        "authorization": "Bearer sk-local", "x-mock-fault": "error-after=2"})
            events = response.content.split(b"\n\n")[:-1]
            assert len(events) == 4 and events[-1] == b"data: [DONE]"
            assert orjson.loads(events[2][6:])["error"]["code"] == "mock_fault"
            nursery.cancel_scope.cancel()


def test_example_values_follow_the_schema() -> None:
    assert example(WEATHER["input_schema"]) == {"city": "lorem", "unit": "C", "days": 1}
    assert example({"type": "array", "items": {"type": "number"}}) == [1.5]
    assert example({"type": ["null", "boolean"]}) is True
    assert example({"type": "object"}) == {}


def test_cli_dialect_and_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[MockNode] = []

    async def serve(self: MockNode, host: str, port: int, *, task_status: Any) -> None:
        made.append(self)
        task_status.started(port)

    monkeypatch.setattr(MockNode, "serve", serve)
    result = CliRunner().invoke(cli_main, [
        "mock", "--port", "3", "--dialect", "anthropic", "--api-key", "k", "--model", "c",
    ])
    assert result.exit_code == 0, result.output
    assert [(n.dialect, n.api_key, n.models) for n in made] == [("anthropic", "k", ("c",))]
    bad = CliRunner().invoke(cli_main, ["mock", "--dialect", "ollama-ish"])
    assert bad.exit_code == 2
