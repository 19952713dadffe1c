"""What users hit in the first hour, end to end: the official openai SDK (or raw HTTP, where the
point is HTTP itself) -> lb -> mock nodes playing real nodes' quirks (a single-slot server that
ignores probes while it generates, 429s with Retry-After, [DONE] then a dropped connection,
llama-cpp-python's strict request ids and its ignorance of max_completion_tokens)."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import httpx
import openai
import orjson
import pytest
import trio
from harness import CHAT, Running, start_lb, start_mock
from harness import sdk as sdk_for

MODEL = "llama-3.1-8b"


async def set_fault(node: Running, fault: str) -> None:
    """A node-wide fault, set once lb has seen the node healthy (probes get it too)."""
    async with httpx.AsyncClient() as client:
        (await client.post(f"{node.url}/mock/fault", json={"fault": fault})).raise_for_status()


async def nodes_view(lb: Running) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        nodes = (await client.get(f"{lb.url}/v1/nodes")).json()["nodes"]
    return {node["node"]: node for node in nodes}


# --- 1. a busy node is not a dead node -------------------------------------------------------


async def test_a_node_busy_generating_is_not_marked_down(nursery: trio.Nursery) -> None:
    """A single-slot node leaves /v1/models unanswered while it generates: the probes time out,
    but a node with requests in flight is not down, and its model stays served."""
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,), busy_probes=True)
        lb = await start_lb(nursery, [node], scan_interval=0.1, health_check_timeout=0.1,
                            health_fail_threshold=1)
        client = sdk_for(lb)
        async with trio.open_nursery() as inner:
            inner.start_soon(lambda: client.chat.completions.create(
                model=MODEL, extra_headers={"x-mock-fault": "ttft-ms=1500"}, **CHAT
            ))
            await trio.sleep(1.0)  # several probes have timed out meanwhile
            view = (await nodes_view(lb))[node.key]
            assert view["healthy"] is True and view["inflight"] == 1
            assert [m.id async for m in client.models.list()] == [MODEL]
        answer = await client.chat.completions.create(model=MODEL, **CHAT)
        assert answer.choices[0].message.content


async def test_a_model_whose_node_is_down_is_503_with_retry_after_not_404(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], scan_interval=0.1, health_fail_threshold=1)
        node.stop()
        while (await nodes_view(lb))[node.key]["healthy"]:
            await trio.sleep(0.05)
        with pytest.raises(openai.InternalServerError) as caught:  # retried by SDKs, unlike 404
            await sdk_for(lb).chat.completions.create(model=MODEL, **CHAT)
        assert caught.value.status_code == 503
        assert caught.value.response.json()["error"]["code"] == "model_unavailable"
        assert caught.value.response.headers["retry-after"] == "1"
        listed = [m async for m in sdk_for(lb).models.list()]
        assert [(m.id, (m.model_extra or {})["available"]) for m in listed] == [(MODEL, False)]
        unavailable = (await nodes_view_full(lb))["unavailable_models"]
        assert unavailable[MODEL]["listed_for_secs"] > 500
        with pytest.raises(openai.NotFoundError):  # a model never served is still a 404
            await sdk_for(lb).chat.completions.create(model="never-seen", **CHAT)


async def nodes_view_full(lb: Running) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        view: dict[str, Any] = (await client.get(f"{lb.url}/v1/nodes")).json()
    return view


# --- 2. node 429s are rate limits --------------------------------------------------------------


async def test_node_429s_are_a_429_and_the_node_rests_for_its_retry_after(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        a = await start_mock(nursery, models=(MODEL,))
        b = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [a, b])
        await set_fault(a, "status=429,retry-after=30")
        await set_fault(b, "status=429,retry-after=5")
        client = sdk_for(lb)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=MODEL, **CHAT)
        assert caught.value.response.headers["retry-after"] == "5"  # the smallest
        with pytest.raises(openai.RateLimitError) as again:
            await client.chat.completions.create(model=MODEL, **CHAT)
        assert int(again.value.response.headers["retry-after"]) <= 5
        # The second call did not reach the nodes: each was asked exactly once.
        assert (await a.chats(), await b.chats()) == (1, 1)
        views = await nodes_view(lb)
        assert views[a.key]["failures"] == views[b.key]["failures"] == 0


# --- 3. a completed stream is a success --------------------------------------------------------


async def test_done_then_a_dropped_connection_is_a_finished_stream(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=4, fault="drop-after-done=1")
        lb = await start_lb(nursery, [node], breaker_threshold=1)
        for _ in range(3):
            stream = await sdk_for(lb).chat.completions.create(
                model=MODEL, stream=True, **CHAT
            )
            chunks = [chunk async for chunk in stream]  # the SDK raises on an error event
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        view = (await nodes_view(lb))[node.key]
        assert view["failures"] == 0 and view["breaker"] == "closed"


# --- 4. the node's own words -------------------------------------------------------------------


async def test_the_nodes_own_error_message_reaches_the_sdk(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        await set_fault(node, "status=500")
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk_for(lb).chat.completions.create(model=MODEL, **CHAT)
        assert "Injected fault: status 500 from mock node" in str(caught.value)
        assert (await nodes_view(lb))[node.key]["last_error"].startswith("HTTP 500: Injected")


# --- 5. browsers -------------------------------------------------------------------------------


async def test_cors_preflight_and_headers_for_allowed_origins(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], cors_origins=("http://chat.local:3000",))
        origin = {"origin": "http://chat.local:3000"}
        async with httpx.AsyncClient(base_url=lb.url) as client:
            preflight = await client.options("/v1/chat/completions", headers={
                **origin, "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type, x-stainless-os",
            })
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == origin["origin"]
            assert "POST" in preflight.headers["access-control-allow-methods"]
            allowed = preflight.headers["access-control-allow-headers"]
            assert {"authorization", "content-type", "x-session-id", "x-stainless-os"} <= {
                h.strip() for h in allowed.split(",")
            }
            assert await node.chats() == 0
            answer = await client.post("/v1/chat/completions", json={"model": MODEL, **CHAT},
                                       headers=origin)
            assert answer.status_code == 200
            assert answer.headers["access-control-allow-origin"] == origin["origin"]
            exposed = answer.headers["access-control-expose-headers"]
            for name in ("x-request-id", "x-selected-model", "x-routed-node", "x-attempts"):
                assert name in exposed
            error = await client.get("/nope", headers=origin)  # errors carry them too
            assert error.headers["access-control-allow-origin"] == origin["origin"]
            other = await client.get("/v1/models", headers={"origin": "http://evil.example"})
            assert "access-control-allow-origin" not in other.headers


async def test_no_cors_headers_by_default(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient(base_url=lb.url) as client:
            answer = await client.get("/v1/models", headers={"origin": "http://a.example"})
            assert "access-control-allow-origin" not in answer.headers
            preflight = await client.options("/v1/models", headers={
                "origin": "http://a.example", "access-control-request-method": "GET"})
            assert preflight.status_code == 405


# --- 6. request ids that trace -----------------------------------------------------------------


async def test_request_ids_never_make_a_strict_node_refuse(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), strict_request_id=True)
        lb = await start_lb(nursery, [node])
        client = sdk_for(lb)
        for headers in ({}, {"x-request-id": "my-trace-42"}):
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, extra_headers=headers, **CHAT
            )
            assert raw.http_response.status_code == 200
            assert raw.headers.get_list("x-request-id") == [headers.get(
                "x-request-id", raw.headers["x-request-id"])]


# --- 7. HTTP manners ---------------------------------------------------------------------------


async def test_status_line_has_a_reason_and_answers_a_date(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        for request, status_line in [
            (b"GET /v1/models HTTP/1.1\r\nhost: x\r\n", b"HTTP/1.1 200 OK\r\n"),
            (b"GET /nope HTTP/1.1\r\nhost: x\r\n", b"HTTP/1.1 404 Not Found\r\n"),
        ]:
            stream = await trio.open_tcp_stream("127.0.0.1", lb.port)
            async with stream:
                await stream.send_all(request + b"connection: close\r\n\r\n")
                received = b""
                while data := await stream.receive_some(65536):
                    received += data
            assert received.startswith(status_line), received[:60]
            assert b"\r\ndate: " in received.lower()


async def test_a_base_url_without_v1_works(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        client = openai.AsyncOpenAI(base_url=lb.url, api_key="x", max_retries=0)
        assert [m.id async for m in client.models.list()] == [MODEL]
        answer = await client.chat.completions.create(model=MODEL, **CHAT)
        assert answer.choices[0].message.content
        embedded = await client.embeddings.create(model=MODEL, input="hello")
        assert embedded.data[0].embedding
        async with httpx.AsyncClient(base_url=lb.url) as raw:
            slashed = await raw.post("/v1/chat/completions/", json={"model": MODEL, **CHAT})
            assert slashed.status_code == 200


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_compressed_request_bodies_are_decoded(nursery: trio.Nursery, coding: str) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        body = orjson.dumps({"model": MODEL, **CHAT})
        packed = gzip.compress(body) if coding == "gzip" else zlib.compress(body)
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{lb.url}/v1/chat/completions", content=packed,
                headers={"content-encoding": coding, "content-type": "application/json"},
            )
        assert answer.status_code == 200, answer.text
        seen = (await node.requests())[-1]
        assert seen["body"]["messages"] == CHAT["messages"]
        assert "content-encoding" not in seen["headers"]


async def test_a_zip_bomb_is_413_and_an_unknown_coding_415(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], max_body_bytes=1_000_000)
        bomb = gzip.compress(b"{" + b" " * 50_000_000 + b"}")  # ~50 KB that inflates to 50 MB
        async with httpx.AsyncClient(base_url=lb.url) as client:
            answer = await client.post("/v1/chat/completions", content=bomb,
                                       headers={"content-encoding": "gzip"})
            assert answer.status_code == 413, answer.text
            assert answer.json()["error"]["code"] == "request_too_large"
            answer = await client.post("/v1/chat/completions", content=b"xx",
                                       headers={"content-encoding": "br"})
            assert answer.status_code == 415
            assert answer.json()["error"]["code"] == "unsupported_media_type"
            answer = await client.post("/v1/chat/completions", content=b"not gzip",
                                       headers={"content-encoding": "gzip"})
            assert answer.status_code == 400
        assert await node.chats() == 0
        assert (await sdk_for(lb).chat.completions.create(model=MODEL, **CHAT)).choices


# --- 8. parameter manners ----------------------------------------------------------------------


async def test_max_completion_tokens_reaches_a_node_that_only_knows_max_tokens(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=50,
                                honours_max_completion_tokens=False)
        lb = await start_lb(nursery, [node])
        answer = await sdk_for(lb).chat.completions.create(
            model=MODEL, max_completion_tokens=3, **CHAT
        )
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        seen = (await node.requests())[-1]["body"]
        assert seen["max_tokens"] == 3 and seen["max_completion_tokens"] == 3


async def test_plain_bodies_reach_the_node_byte_for_byte(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        body = b'{"model":  "llama-3.1-8b", "max_tokens": 5,\n "messages": ' \
               b'[{"role": "user", "content": "hi"}], "x_extra": [1, 2.50]}'
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{lb.url}/v1/chat/completions", content=body)
        assert answer.status_code == 200
        assert (await node.requests())[-1]["raw_body"] == body.decode()


async def test_cookies_are_not_forwarded(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{lb.url}/v1/chat/completions",
                                       json={"model": MODEL, **CHAT},
                                       headers={"cookie": "session=secret"})
        assert answer.status_code == 200
        assert "cookie" not in (await node.requests())[-1]["headers"]
