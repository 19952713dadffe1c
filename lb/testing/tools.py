"""The mock node's tool calls (opt-in, `MockNode(tool_calls=True)`): a chat request that offers
tools is answered with one call to a tool, its arguments streamed in several pieces as real
servers do, so clients' tool handling is tested end to end. A request whose last message is a
tool result, or whose tool_choice is "none", gets the ordinary text answer (the loop ends).

The tool is the one `tool_choice` names, else the first offered; its arguments fit the tool's
parameter schema (`example`), as the Anthropic and Ollama mocks' do.
"""

from __future__ import annotations

from typing import Any

import orjson
import trio

from lb.http.sse import DONE, SSE_HEADERS
from lb.http.types import Response, ResponseSink

ARGUMENT_PIECE = 7  # bytes of arguments per streamed delta


def wanted_tool(body: dict[str, Any]) -> str | None:
    """The name of the tool the mock calls for this request, or None for a text answer."""
    tools = body.get("tools")
    messages = body.get("messages")
    if not isinstance(tools, list) or not tools or not isinstance(messages, list):
        return None
    choice = body.get("tool_choice")
    if choice == "none" or (messages and isinstance(messages[-1], dict)
                            and messages[-1].get("role") == "tool"):
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if isinstance(name, str):
            return name
    first = tools[0].get("function") if isinstance(tools[0], dict) else None
    return str(first.get("name")) if isinstance(first, dict) else None


def arguments_for(body: dict[str, Any], name: str) -> str:
    """Arguments for tool `name` that fit its parameter schema."""
    for tool in body["tools"]:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name") == name:
            return orjson.dumps(example(function.get("parameters"))).decode()
    return "{}"


def example(schema: Any) -> Any:
    """A value that fits a JSON schema's common shapes."""
    if not isinstance(schema, dict):
        return "lorem"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        return {name: example(sub) for name, sub in properties.items()}
    if kind == "array":
        return [example(schema.get("items"))]
    scalars: dict[Any, Any] = {"integer": 1, "number": 1.5, "boolean": True, "null": None}
    return scalars.get(kind, "lorem")



def tool_answer(
    body: dict[str, Any], name: str, cid: str, created: int, model: str,
    usage: dict[str, int], ttft: float,
) -> Response:
    """The chat answer calling tool `name`: JSON, or a stream (usage when asked for)."""
    arguments = arguments_for(body, name)
    call_id = f"call_{cid}"
    if body.get("stream") is not True:
        return Response.json({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [{
                    "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }]},
                "logprobs": None,
                "finish_reason": "tool_calls",
            }],
            "usage": usage,
        })
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

    frames = [chunk({"role": "assistant", "content": None, "tool_calls": [{
        "index": 0, "id": call_id, "type": "function",
        "function": {"name": name, "arguments": ""},
    }]})]
    for i in range(0, len(arguments), ARGUMENT_PIECE):
        piece = arguments[i : i + ARGUMENT_PIECE]
        frames.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    frames.append(chunk({}, "tool_calls"))
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        frames.append(
            b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n"
        )
    frames.append(DONE)

    async def write(sink: ResponseSink) -> None:
        if ttft > 0:
            await trio.sleep(ttft)
        for frame in frames:
            await sink.send(frame)

    return Response(200, list(SSE_HEADERS), stream=write)
