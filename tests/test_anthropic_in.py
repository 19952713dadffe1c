"""`POST /v1/messages` end to end: the official anthropic SDK -> lb -> OpenAI mock nodes over
real sockets. Chat, streams, tools with streamed arguments, and every error in Anthropic's shape
(before the head and inside a stream)."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import orjson
import pytest
import trio
from harness import Running, json_answer, read_body, start_lb, start_mock, start_scripted

from lb.config import NodeConfig

MODEL = "llama-3.1-8b"
HELLO: list[Any] = [{"role": "user", "content": "hello world"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"},
        "units": {"type": "string", "enum": ["metric", "imperial"]},
    }},
}


def client_for(lb: Running) -> anthropic.AsyncAnthropic:
    """The official client, retries off so that lb's answer shows."""
    return anthropic.AsyncAnthropic(base_url=lb.url, api_key="sk-client", max_retries=0)


async def test_message_non_stream(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=5)
        lb = await start_lb(nursery, [node])
        message = await client_for(lb).messages.create(
            model=MODEL, max_tokens=64, system="Be brief.", messages=HELLO,
            stop_sequences=["\n\n"], extra_body={"temperature": 0.2},
            extra_headers={"anthropic-beta": "some-beta"},
        )
        assert isinstance(message, anthropic.types.Message)
        assert message.id.startswith("msg_") and message.model == MODEL
        assert [block.type for block in message.content] == ["text"]
        assert message.content[0].text == "Lorem ipsum dolor sit amet"  # type: ignore[union-attr]
        assert message.stop_reason == "end_turn"
        assert message.usage.output_tokens == 5 and message.usage.input_tokens > 0
        sent = (await node.requests())[-1]
        body = sent["body"]
        assert body["messages"][0] == {"role": "system", "content": "Be brief."}
        assert body["max_tokens"] == 64 and body["stop"] == ["\n\n"]
        assert body["temperature"] == 0.2
        # The client's credentials and Anthropic's headers stay in lb.
        assert not {"x-api-key", "authorization", "anthropic-version", "anthropic-beta"} & set(
            sent["headers"]
        )


async def test_max_tokens_cuts_the_answer(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=8)
        lb = await start_lb(nursery, [node])
        message = await client_for(lb).messages.create(
            model=MODEL, max_tokens=3, messages=HELLO
        )
        assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


async def test_stream_with_get_final_message(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=6, itl_ms=1)
        lb = await start_lb(nursery, [node])
        async with client_for(lb).messages.stream(
            model=MODEL, max_tokens=64, messages=HELLO
        ) as stream:
            texts = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        assert "".join(texts) == "Lorem ipsum dolor sit amet consectetur"
        assert final.content[0].text == "".join(texts)  # type: ignore[union-attr]
        assert final.stop_reason == "end_turn"
        assert final.usage.output_tokens == 6 and final.usage.input_tokens > 0
        sent = (await node.requests())[-1]["body"]
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_raw_event_sequence(nursery: trio.Nursery) -> None:
    """The events and their order, as Anthropic sends them."""
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=2)
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{lb.url}/v1/messages",
                json={"model": MODEL, "max_tokens": 10, "messages": HELLO, "stream": True},
                headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
            )
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/event-stream"
        events = [line[7:] for line in answer.text.splitlines() if line.startswith("event: ")]
        assert events == [
            "message_start", "ping", "content_block_start", "content_block_delta",
            "content_block_delta", "content_block_stop", "message_delta", "message_stop",
        ]


async def test_tools_non_stream_and_the_result_round_trip(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tool_calls=True)
        lb = await start_lb(nursery, [node])
        client = client_for(lb)
        question: list[Any] = [{"role": "user", "content": "weather in Paris"}]
        message = await client.messages.create(
            model=MODEL, max_tokens=64, messages=question, tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "tool", "name": "get_weather"},
        )
        assert message.stop_reason == "tool_use"
        (call,) = message.content
        assert isinstance(call, anthropic.types.ToolUseBlock)
        assert call.name == "get_weather"
        assert call.input == {"query": "lorem", "limit": 1, "units": "metric"}
        sent = (await node.requests())[-1]["body"]
        assert sent["tools"] == [{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city",
            "parameters": WEATHER["input_schema"],
        }}]
        assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
        # The client answers the call: the node sees the assistant's call and the tool result.
        follow_up = [
            *question,
            {"role": "assistant", "content": [block.model_dump() for block in message.content]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21°C"},
            ]},
        ]
        answer = await client.messages.create(
            model=MODEL, max_tokens=64, messages=follow_up, tools=[WEATHER],  # type: ignore[list-item]
        )
        assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"
        sent = (await node.requests())[-1]["body"]
        assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
        assert orjson.loads(sent["messages"][1]["tool_calls"][0]["function"]["arguments"]) == (
            call.input
        )
        assert sent["messages"][2] == {
            "role": "tool", "tool_call_id": call.id, "content": "sunny, 21°C"
        }


async def test_tools_stream_with_streamed_arguments(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tool_calls=True)
        lb = await start_lb(nursery, [node])
        partials: list[str] = []
        async with client_for(lb).messages.stream(
            model=MODEL, max_tokens=64, tools=[WEATHER],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "weather in a long-named city"}],
        ) as stream:
            async for event in stream:
                if event.type == "input_json":
                    partials.append(event.partial_json)
            final = await stream.get_final_message()
        assert len(partials) > 3  # the arguments came in pieces, as the node sent them
        assert final.stop_reason == "tool_use"
        (call,) = final.content
        assert isinstance(call, anthropic.types.ToolUseBlock)
        assert call.input == {"query": "lorem", "limit": 1, "units": "metric"}
        assert final.usage.output_tokens > 0


async def test_unknown_model_is_not_found_error(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        with pytest.raises(anthropic.NotFoundError) as caught:
            await client_for(lb).messages.create(model="nope", max_tokens=5, messages=HELLO)
        assert caught.value.body == {"type": "error", "error": {
            "type": "not_found_error", "message": caught.value.body["error"]["message"],  # type: ignore[index, call-overload]
        }}
        assert "nope" in caught.value.message


@pytest.mark.parametrize("body, wanted", [
    ({"model": MODEL, "messages": HELLO}, "max_tokens"),
    ({"model": MODEL, "max_tokens": 0, "messages": HELLO}, "max_tokens"),
    ({"max_tokens": 5, "messages": HELLO}, "model"),
    ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
     "role"),
    ({"model": MODEL, "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "audio", "data": "x"}]}]}, "audio"),
])
async def test_bad_requests_are_invalid_request_errors(
    nursery: trio.Nursery, body: dict[str, Any], wanted: str
) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client_for(lb).post("/v1/messages", body=body, cast_to=httpx.Response)
        error = caught.value.body["error"]  # type: ignore[index, call-overload]
        assert error["type"] == "invalid_request_error" and wanted in error["message"]
        assert await node.chats() == 0  # refused before any node was asked
        # ... and lb keeps serving.
        message = await client_for(lb).messages.create(model=MODEL, max_tokens=5, messages=HELLO)
        assert message.content


async def test_invalid_json_is_an_anthropic_400(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{lb.url}/v1/messages", content=b"{nope")
        assert answer.status_code == 400
        assert answer.json()["type"] == "error"
        assert answer.json()["error"]["type"] == "invalid_request_error"


async def test_a_node_error_answer_is_translated(nursery: trio.Nursery) -> None:
    """A node's own 4xx passes to the client, in Anthropic's words."""
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        with pytest.raises(anthropic.PermissionDeniedError) as caught:
            await client_for(lb).messages.create(
                model=MODEL, max_tokens=5, messages=HELLO,
                extra_headers={"x-mock-fault": "status=403"},
            )
        error = caught.value.body["error"]  # type: ignore[index, call-overload]
        assert error["type"] == "permission_error" and "Injected fault" in error["message"]


async def test_a_dead_node_is_an_overloaded_503(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], scan_interval=0.1, health_fail_threshold=1)
        node.stop()
        with pytest.raises(anthropic.APIStatusError) as caught:
            while True:  # until lb has seen the node die (or the attempt fails: 502)
                await client_for(lb).messages.create(model=MODEL, max_tokens=5, messages=HELLO)
                await trio.sleep(0.05)
        error = caught.value.body["error"]  # type: ignore[index, call-overload]
        if caught.value.status_code == 503:
            assert isinstance(caught.value, anthropic.ServiceUnavailableError)
            assert error["type"] == "overloaded_error"
        else:
            assert caught.value.status_code == 502
            assert isinstance(caught.value, anthropic.InternalServerError)
            assert error["type"] == "api_error"


async def test_all_nodes_failing_is_api_error_502(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        with pytest.raises(anthropic.InternalServerError) as caught:
            await client_for(lb).messages.create(
                model=MODEL, max_tokens=5, messages=HELLO, stream=True,
                extra_headers={"x-mock-fault": "status=500"},
            )
        assert caught.value.status_code == 502
        assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index, call-overload]


async def test_a_stream_broken_midway_ends_with_an_error_event(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=8)
        lb = await start_lb(nursery, [node])
        texts: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with client_for(lb).messages.stream(
                model=MODEL, max_tokens=64, messages=HELLO,
                extra_headers={"x-mock-fault": "drop-after=3"},
            ) as stream:
                async for text in stream.text_stream:
                    texts.append(text)
        assert texts == ["Lorem", " ipsum"]  # the role chunk, then two tokens, then the cut
        error = caught.value.body["error"]  # type: ignore[index, call-overload]
        assert error["type"] == "api_error"
        assert error["message"].startswith(f"Node {node.key} ")  # which node broke, and how


async def test_count_tokens_is_an_estimate(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        client = client_for(lb)
        short = await client.messages.count_tokens(model=MODEL, messages=HELLO)
        long = await client.messages.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": "hello world " * 100}]
        )
        assert 0 < short.input_tokens < long.input_tokens
        assert 250 <= long.input_tokens <= 400  # about 4 bytes a token
        assert await node.chats() == 0


def _completion(text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-7", "object": "chat.completion", "model": MODEL, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


async def test_a_node_answering_json_to_a_stream_request(nursery: trio.Nursery) -> None:
    """Some servers ignore `stream`: the client still gets Anthropic's event stream."""

    async def script(head: bytes, stream: trio.SocketStream, buffered: bytearray) -> None:
        await read_body(stream, head, buffered)
        await stream.send_all(json_answer(_completion("whole answer")))

    with trio.fail_after(10):
        node = await start_scripted(nursery, script, (MODEL,))
        lb = await start_lb(nursery, [node])
        async with client_for(lb).messages.stream(
            model=MODEL, max_tokens=9, messages=HELLO
        ) as stream:
            final = await stream.get_final_message()
        assert final.content[0].text == "whole answer"  # type: ignore[union-attr]
        assert final.usage.input_tokens == 3 and final.usage.output_tokens == 2


async def test_a_node_streaming_to_a_json_request_is_a_502(nursery: trio.Nursery) -> None:
    async def script(head: bytes, stream: trio.SocketStream, buffered: bytearray) -> None:
        await read_body(stream, head, buffered)
        event = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n'
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"content-length: " + str(len(event)).encode() + b"\r\n\r\n" + event
        )

    with trio.fail_after(10):
        node = await start_scripted(nursery, script, (MODEL,))
        lb = await start_lb(nursery, [node])
        with pytest.raises(anthropic.InternalServerError) as caught:
            await client_for(lb).messages.create(model=MODEL, max_tokens=9, messages=HELLO)
        assert caught.value.status_code == 502
        assert "did not ask for a stream" in caught.value.body["error"]["message"]  # type: ignore[index, call-overload]


async def test_the_clients_key_reaches_only_a_forward_auth_node(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [], configs=(NodeConfig(node.url, forward_auth=True),))
        await client_for(lb).messages.create(model=MODEL, max_tokens=5, messages=HELLO)
        headers = (await node.requests())[-1]["headers"]
        assert headers["authorization"] == "Bearer sk-client"  # the x-api-key, as a bearer
        assert "x-api-key" not in headers and "anthropic-version" not in headers


async def test_in_front_of_an_ollama_native_node(nursery: trio.Nursery) -> None:
    """lb translates twice: Anthropic -> OpenAI at the edge, OpenAI -> Ollama in dispatch."""
    with trio.fail_after(20):
        node = await start_mock(nursery, models=("llama3:8b",), tokens=4)
        lb = await start_lb(nursery, [], configs=(NodeConfig(node.url, dialect="ollama"),))
        client = client_for(lb)
        message = await client.messages.create(
            model="llama3:8b", max_tokens=3, messages=HELLO
        )
        assert message.content[0].text == "Lorem ipsum dolor"  # type: ignore[union-attr]
        assert message.stop_reason == "max_tokens"
        assert (await node.requests())[-1]["path"] == "/api/chat"
        async with client.messages.stream(
            model="llama3:8b", max_tokens=50, messages=HELLO
        ) as stream:
            final = await stream.get_final_message()
        assert final.content[0].text == "Lorem ipsum dolor sit"  # type: ignore[union-attr]
        assert final.stop_reason == "end_turn" and final.usage.output_tokens == 4
        tool = {"name": "get_weather", "input_schema": {
            "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}
        async with client.messages.stream(
            model="llama3:8b", max_tokens=50, messages=HELLO, tools=[tool],  # type: ignore[list-item]
        ) as stream:
            final = await stream.get_final_message()
        assert final.stop_reason == "tool_use"
        (call,) = final.content
        assert isinstance(call, anthropic.types.ToolUseBlock)
        assert call.name == "get_weather" and isinstance(call.input, dict)
        assert "city" in call.input
