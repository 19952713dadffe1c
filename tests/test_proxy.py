"""End to end: the official openai SDK -> lb -> `lb mock` nodes, over real sockets."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import openai
import orjson
import pytest
import trio
from harness import CHAT, start_lb, start_mock
from harness import sdk as sdk_for

MODEL = "llama-3.1-8b"


async def test_chat_non_stream_with_routing_headers(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=5)
        lb = await start_lb(nursery, [node])
        raw = await sdk_for(lb).chat.completions.with_raw_response.create(
            model="auto", **CHAT, extra_headers={"x-request-id": "req-1"}
        )
        answer = raw.parse()
        assert answer.model == MODEL
        assert len(answer.choices[0].message.content.split()) == 5
        assert raw.headers["x-selected-model"] == MODEL
        assert raw.headers["x-routed-node"] == node.key
        assert raw.headers["x-request-id"] == "req-1"
        assert raw.headers["x-attempts"] == "1"
        seen = await node.requests()
        assert seen[-1]["body"]["model"] == MODEL  # the node got the resolved id


async def test_stream_passes_every_event_through(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=6)
        lb = await start_lb(nursery, [node])
        stream = await sdk_for(lb).chat.completions.create(
            model=MODEL, stream=True, stream_options={"include_usage": True}, **CHAT
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text.split()) == 6
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_stream_bytes_are_untouched(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=4)
        lb = await start_lb(nursery, [node])
        body = {"model": MODEL, "stream": True, **CHAT}
        async with httpx.AsyncClient() as client:
            direct = (await client.post(f"{node.url}/v1/chat/completions", json=body)).content
            proxied = await client.post(f"{lb.url}/v1/chat/completions", json=body)
        assert proxied.headers["content-type"].startswith("text/event-stream")
        assert "transfer-encoding" not in proxied.headers or proxied.headers[
            "transfer-encoding"] == "chunked"

        def shape(data: bytes) -> list[bytes]:  # ids and timestamps differ per answer
            return [line.split(b'"object"')[-1] for line in data.split(b"\n\n")]

        assert shape(proxied.content) == shape(direct)
        assert proxied.content.endswith(b"data: [DONE]\n\n")


async def test_embeddings_and_completions(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL, "nomic-embed-text"), embedding_dim=16)
        lb = await start_lb(nursery, [node])
        client = sdk_for(lb)
        vectors = await client.embeddings.create(model="auto", input=["a cat", "a dog"])
        assert vectors.model == "nomic-embed-text"  # 'auto' for embeddings: an embedding model
        assert [len(item.embedding) for item in vectors.data] == [16, 16]
        chat = await client.chat.completions.create(model="auto", **CHAT)
        assert chat.model == MODEL  # and chat never gets the embedding model
        text = await client.completions.create(model="auto", prompt="once upon")
        assert text.choices[0].text


async def test_models_union_and_lookup(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        a = await start_mock(nursery, models=(MODEL, "qwen/qwen3-8b"))
        b = await start_mock(nursery, models=(MODEL, "gemma3-270m"))
        lb = await start_lb(nursery, [a, b])
        client = sdk_for(lb)
        ids = [model.id async for model in client.models.list()]
        assert ids == sorted({MODEL, "qwen/qwen3-8b", "gemma3-270m"})
        model = await client.models.retrieve("qwen/qwen3-8b")  # LM Studio ids have slashes
        assert model.id == "qwen/qwen3-8b"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope")


async def test_unknown_model_is_404_and_server_keeps_serving(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        client = sdk_for(lb)
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="no-such-model", **CHAT)
        assert caught.value.code == "model_not_found"
        assert (await client.chat.completions.create(model=MODEL, **CHAT)).model == MODEL


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (orjson.dumps({"messages": [{"role": "user", "content": "x"}]}), 400,
         "missing_parameter", "model"),
        (orjson.dumps({"model": 7, "messages": []}), 400, "invalid_type", "model"),
        (orjson.dumps({"model": "auto"}), 400, "missing_parameter", "messages"),
        (orjson.dumps({"model": "auto", "messages": []}), 400, "invalid_type", "messages"),
        (orjson.dumps({"model": "auto", "messages": [{}], "stream": "yes"}), 400,
         "invalid_type", "stream"),
    ],
)
async def test_bad_requests_get_openai_errors(
    nursery: trio.Nursery, body: bytes, status: int, code: str, param: str | None
) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{lb.url}/v1/chat/completions", content=body)
            assert answer.status_code == status
            error = answer.json()["error"]
            assert (error["code"], error["param"]) == (code, param)
            assert error["type"] == "invalid_request_error" and error["message"]
            again = await client.post(
                f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT}
            )
            assert again.status_code == 200
        assert await node.chats() == 1  # the bad one never reached the node


async def test_embeddings_cannot_stream(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=("nomic-embed-text",))
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{lb.url}/v1/embeddings",
                json={"model": "auto", "input": "x", "stream": True},
            )
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "stream"


async def test_unknown_fields_pass_through(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        await sdk_for(lb).chat.completions.create(
            model="auto", **CHAT, extra_body={"optillm_approach": "moa", "top_k": 3}
        )
        body = (await node.requests())[-1]["body"]
        assert body["optillm_approach"] == "moa" and body["top_k"] == 3


async def test_node_gets_json_content_type_and_no_hop_by_hop_headers(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        body = orjson.dumps({"model": MODEL, **CHAT})
        sock = await trio.open_tcp_stream("127.0.0.1", lb.port)
        await sock.send_all(  # no content-type at all, and headers that are the hop's own
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nkeep-alive: timeout=5\r\n"
            b"te: trailers\r\naccept-encoding: gzip\r\nx-custom: kept\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body
        )
        assert b"200" in (await sock.receive_some(65536)).split(b"\r\n")[0]
        await sock.aclose()
        headers = (await node.requests())[-1]["headers"]
        assert headers["content-type"] == "application/json"
        assert headers["x-custom"] == "kept"
        assert not {"keep-alive", "te", "accept-encoding"} & set(headers)


async def test_preferred_models_and_prefer_small(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=("qwen3-8b", "gemma3-270m", "llama-3.1-70b"))
        lb = await start_lb(nursery, [node], preferred_models=("llama-3.1-70b", "qwen3-8b"))
        client = sdk_for(lb)
        assert (await client.chat.completions.create(model="auto", **CHAT)).model == (
            "llama-3.1-70b"
        )
        small = await client.chat.completions.create(
            model="default", **CHAT, extra_headers={"x-prefer-small": "1"}
        )
        assert small.model == "gemma3-270m"


async def test_lm_model_adds_a_sentinel(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], lm_model="whatever-you-have")
        answer = await sdk_for(lb).chat.completions.create(model="whatever-you-have", **CHAT)
        assert answer.model == MODEL


async def test_forced_node(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        a = await start_mock(nursery, models=(MODEL,), name="a")
        b = await start_mock(nursery, models=(MODEL, "only-a-model"), name="b")
        lb = await start_lb(nursery, [a, b], routing_strategy="ROUND_ROBIN")
        client = sdk_for(lb)
        for _ in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, **CHAT, extra_query={"node": b.key}
            )
            assert raw.headers["x-routed-node"] == b.key
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(
                model="only-a-model", **CHAT, extra_query={"node": a.key}
            )
        assert caught.value.code == "node_not_found"


async def _routed(lb: Any, count: int, stream: bool = False, **headers: str) -> list[str]:
    client = sdk_for(lb)
    nodes = []
    for _ in range(count):
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, stream=stream, **CHAT, extra_headers=headers
        )
        nodes.append(raw.headers["x-routed-node"])
    return nodes


async def test_round_robin_alternates(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        nodes = [await start_mock(nursery, models=(MODEL,)) for _ in range(3)]
        lb = await start_lb(nursery, nodes, routing_strategy="round_robin")
        routed = await _routed(lb, 9)
        assert Counter(routed) == {node.key: 3 for node in nodes}
        assert len(set(routed[:3])) == 3


async def test_random_spreads(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        nodes = [await start_mock(nursery, models=(MODEL,)) for _ in range(2)]
        lb = await start_lb(nursery, nodes, routing_strategy="RANDOM")
        counts = Counter(await _routed(lb, 40))
        assert set(counts) == {node.key for node in nodes}


async def test_least_loaded_avoids_the_busy_node(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        a = await start_mock(nursery, models=(MODEL,))
        b = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [a, b], routing_strategy="LEAST_LOADED")
        client = sdk_for(lb)
        busy: list[str] = []

        async def slow() -> None:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, **CHAT, extra_headers={"x-mock-fault": "ttft-ms=1500"}
            )
            busy.append(raw.headers["x-routed-node"])

        nursery.start_soon(slow)
        while (await a.stats())["concurrent"] + (await b.stats())["concurrent"] == 0:
            await trio.sleep(0.01)
        routed = await _routed(lb, 6)
        busy_node = a.key if (await a.stats())["concurrent"] else b.key
        assert busy_node not in routed  # every quick request went to the idle node


async def test_sticky_sessions(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        nodes = [await start_mock(nursery, models=(MODEL,)) for _ in range(3)]
        lb = await start_lb(nursery, nodes, routing_strategy="ROUND_ROBIN")
        homes = {}
        for session in ("alice", "bob", "carol", "dave", "erin", "frank"):
            routed = await _routed(lb, 4, **{"x-session-id": session})
            assert len(set(routed)) == 1, routed
            homes[session] = routed[0]
        assert len(set(homes.values())) > 1  # sessions spread over nodes
        # A second lb instance with the same nodes sends each session to the same node.
        other = await start_lb(nursery, list(reversed(nodes)))
        for session, home in homes.items():
            assert (await _routed(other, 1, **{"x-session-id": session})) == [home]


async def test_failover_when_a_node_is_killed(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        a = await start_mock(nursery, models=(MODEL,), ttft_ms=20)
        b = await start_mock(nursery, models=(MODEL,), ttft_ms=20)
        lb = await start_lb(nursery, [a, b], routing_strategy="ROUND_ROBIN", scan_interval=60)
        client = sdk_for(lb)
        failures: list[BaseException] = []
        done = 0

        async def worker(stream: bool) -> None:
            nonlocal done
            for _ in range(10):
                try:
                    if stream:
                        chunks = await client.chat.completions.create(
                            model=MODEL, stream=True, **CHAT
                        )
                        assert len([c async for c in chunks]) == 10
                    else:
                        await client.chat.completions.create(model=MODEL, **CHAT)
                    done += 1
                except Exception as exc:  # collected and asserted below
                    failures.append(exc)

        # Requests are in flight on both nodes (waiting for their first token) when `a` dies;
        # lb still believes it healthy, so later requests are sent to it too and fail over.
        async with trio.open_nursery() as clients:
            for _ in range(6):
                clients.start_soon(worker, False)
            while done < 10 or (await a.stats())["concurrent"] == 0:
                await trio.sleep(0.002)
            a.stop()
        async with trio.open_nursery() as clients:
            for _ in range(3):
                clients.start_soon(worker, True)
        assert failures == []
        assert done == 90
        async with httpx.AsyncClient() as http:
            nodes = (await http.get(f"{lb.url}/v1/nodes")).json()["nodes"]
        dead = next(n for n in nodes if n["node"] == a.key)
        assert dead["failures"] >= 1


async def test_all_nodes_dead_is_502_listing_attempts(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        a = await start_mock(nursery, models=(MODEL,))
        b = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [a, b], max_retries=2, scan_interval=60)
        a.stop()
        b.stop()
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT}
            )
            assert answer.status_code == 502
            error = answer.json()["error"]
            assert error["code"] == "all_upstreams_failed"
            assert a.key in error["message"] and b.key in error["message"]
            assert answer.headers["x-attempts"] == "3"
            assert (await client.get(f"{lb.url}/health/liveliness")).status_code == 200


async def test_5xx_fails_over_and_4xx_passes_through(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        bad = await start_mock(nursery, models=(MODEL,), fault="status=503")
        good = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [bad, good], routing_strategy="ROUND_ROBIN")
        routed = await _routed(lb, 4)
        assert set(routed) == {good.key}
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{lb.url}/v1/chat/completions",
                json={"model": MODEL, **CHAT},
                headers={"x-mock-fault": "status=422"},
            )
            assert answer.status_code == 422
            assert answer.json()["error"]["message"]  # the node's own error body
            nodes = (await client.get(f"{lb.url}/v1/nodes")).json()["nodes"]
        assert {n["node"]: n["consecutive_failures"] for n in nodes}[good.key] == 0


async def test_429_from_node_moves_on_without_tripping_breaker(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        busy = await start_mock(nursery, models=(MODEL,), fault="status=429")
        good = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [busy, good], routing_strategy="ROUND_ROBIN",
                            breaker_threshold=1)
        assert set(await _routed(lb, 4)) == {good.key}
        async with httpx.AsyncClient() as client:
            nodes = (await client.get(f"{lb.url}/v1/nodes")).json()["nodes"]
        assert {n["node"]: n["breaker"] for n in nodes}[busy.key] == "closed"


async def test_breaker_opens_half_opens_and_closes(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1  # real time passes too; jump() skips the breaker's 30 s
    with trio.fail_after(100):  # 62 s of it are jumps
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(
            nursery, [node], breaker_threshold=3, breaker_ttl=30, max_retries=0,
            scan_interval=3600, keepalive_timeout=3600,
        )
        async with httpx.AsyncClient() as client:

            async def ask(fault: str = "") -> httpx.Response:
                return await client.post(
                    f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT},
                    headers={"x-mock-fault": fault} if fault else {},
                )

            async def breaker() -> str:
                nodes = (await client.get(f"{lb.url}/v1/nodes")).json()["nodes"]
                state: str = nodes[0]["breaker"]
                return state

            for _ in range(3):
                assert (await ask("status=500")).status_code == 502
            assert await breaker() == "open"
            refused = await ask()
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "no_healthy_node"
            assert await node.chats() == 3  # the open breaker kept it away
            mock_clock.jump(31)
            assert await breaker() == "half_open"
            assert (await ask("status=500")).status_code == 502  # the probe fails: open again
            assert await breaker() == "open"
            mock_clock.jump(31)
            assert (await ask()).status_code == 200  # the probe succeeds: closed
            assert await breaker() == "closed"


async def test_deadline_is_504_and_node_sees_the_disconnect(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT},
                headers={"x-request-budget-ms": "300", "x-mock-fault": "hang=1"},
            )
        assert answer.status_code == 504
        assert answer.json()["error"]["code"] == "deadline_exceeded"
        with trio.fail_after(1):
            while (await node.stats())["disconnects"] != 1:
                await trio.sleep(0.01)


@pytest.mark.parametrize("budget", ["soon", "nan", "-5", "inf"])
async def test_bad_request_budget_is_400(nursery: trio.Nursery, budget: str) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT},
                headers={"x-request-budget-ms": budget},
            )
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "x-request-budget-ms"


async def test_attempt_timeout_moves_to_another_node(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        slow = await start_mock(nursery, models=(MODEL,))
        good = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [slow, good], routing_strategy="ROUND_ROBIN",
                            attempt_timeout=0.2)
        async with httpx.AsyncClient() as client:
            await client.post(f"{slow.url}/mock/fault", json={"fault": "hang=1"})
        # A stream's head is due within ATTEMPT_TIMEOUT_SECS (a non-stream answer's head comes
        # after the whole generation, so only the request deadline bounds it).
        routed = await _routed(lb, 2, stream=True)
        assert set(routed) == {good.key}
        assert (await slow.stats())["disconnects"] >= 1


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_reaches_the_node(nursery: trio.Nursery, stream: bool) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), ttft_ms=50, itl_ms=100, tokens=50)
        lb = await start_lb(nursery, [node])
        body = orjson.dumps({"model": MODEL, "stream": stream, **CHAT})
        sock = await trio.open_tcp_stream("127.0.0.1", lb.port)
        await sock.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body
        )
        if stream:
            assert b"200" in await sock.receive_some(4096)  # the stream has started
        else:
            while (await node.stats())["concurrent"] == 0:
                await trio.sleep(0.01)
        await sock.aclose()
        gone = trio.current_time()
        while (await node.stats())["disconnects"] == 0:
            await trio.sleep(0.005)
        assert trio.current_time() - gone < 0.5


async def test_mid_stream_failure_is_one_error_event(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        a = await start_mock(nursery, models=(MODEL,), tokens=8, fault="drop-after=3")
        b = await start_mock(nursery, models=(MODEL,), tokens=8, fault="drop-after=3")
        lb = await start_lb(nursery, [a, b])
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{lb.url}/v1/chat/completions", json={"model": MODEL, "stream": True, **CHAT}
            )
        assert answer.status_code == 200
        events = [e for e in answer.content.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        errors = [e for e in events if b'"error"' in e]
        assert len(errors) == 1
        assert orjson.loads(errors[0][6:])["error"]["code"] == "upstream_stream_error"
        assert len(events) == 3 + 1 + 1  # three real events, the error, [DONE]: no splicing
        assert answer.headers["x-attempts"] == "1"
        assert await a.chats() + await b.chats() == 1  # no retry once bytes reached the client


async def test_stream_gone_quiet_is_one_error_event(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], stream_idle_timeout=0.2)
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{lb.url}/v1/chat/completions", json={"model": MODEL, "stream": True, **CHAT},
                headers={"x-mock-fault": "itl-ms=2000,tokens=5"},
            )
        events = [e for e in answer.content.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        errors = [e for e in events if b'"error"' in e]
        assert len(errors) == 1 and b"idle" in errors[0]
        assert len(events) == 2 + 1 + 1  # role chunk and first token, the error, [DONE]
        with trio.fail_after(1):
            while (await node.stats())["disconnects"] != 1:
                await trio.sleep(0.01)  # and the node's stream was closed


async def test_stream_that_fails_before_any_byte_is_retried(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        a = await start_mock(nursery, models=(MODEL,), tokens=4, fault="drop-after=0")
        b = await start_mock(nursery, models=(MODEL,), tokens=4)
        lb = await start_lb(nursery, [a, b], routing_strategy="ROUND_ROBIN")
        for _ in range(2):
            stream = await sdk_for(lb).chat.completions.create(model=MODEL, stream=True, **CHAT)
            assert len([chunk async for chunk in stream]) == 6


async def test_capacity_429_with_retry_after(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], default_maxconn=1)
        async with httpx.AsyncClient() as client, trio.open_nursery() as holders:

            async def hold() -> None:
                async with httpx.AsyncClient() as own:
                    held = await own.post(
                        f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT},
                        headers={"x-mock-fault": "ttft-ms=500"},
                    )
                    assert held.status_code == 200

            holders.start_soon(hold)
            while (await node.stats())["concurrent"] == 0:
                await trio.sleep(0.01)
            answer = await client.post(
                f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT}
            )
            assert answer.status_code == 429
            assert answer.headers["retry-after"] == "1"
            assert answer.json()["error"]["code"] == "capacity_exceeded"
            nodes = (await client.get(f"{lb.url}/v1/nodes")).json()["nodes"]
            assert nodes[0]["inflight"] == 1 and nodes[0]["maxconn"] == 1
            assert nodes[0]["consecutive_failures"] == 0  # capacity is not failure


async def test_queue_waits_for_a_slot(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), ttft_ms=100)
        lb = await start_lb(nursery, [node], default_maxconn=2, queue_timeout=5)
        client = sdk_for(lb)
        async with trio.open_nursery() as clients:
            for _ in range(8):
                clients.start_soon(lambda: client.chat.completions.create(model=MODEL, **CHAT))
        stats = await node.stats()
        assert await node.chats() == 8 and stats["max_concurrent"] == 2


async def test_nodes_eligible_and_health(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        a = await start_mock(nursery, models=(MODEL,))
        b = await start_mock(nursery, models=("qwen3-8b",))
        lb = await start_lb(nursery, [a, b], min_healthy_nodes=2, maxconn_map={b.key: 4})
        async with httpx.AsyncClient() as client:
            nodes = (await client.get(f"{lb.url}/v1/nodes")).json()["nodes"]
            assert [(n["node"], n["models"], n["maxconn"], n["healthy"]) for n in nodes] == [
                (a.key, [MODEL], 0, True), (b.key, ["qwen3-8b"], 4, True)
            ]
            eligible = (await client.get(f"{lb.url}/v1/eligible_nodes?model=qwen3-8b")).json()
            assert [n["node"] for n in eligible["nodes"]] == [b.key]
            missing = await client.get(f"{lb.url}/v1/eligible_nodes")
            assert missing.status_code == 400
            health = await client.get(f"{lb.url}/health")
            assert health.status_code == 200
            assert health.json() == {"status": "ok", "nodes_found": 2, "minimum_required": 2}
        b.stop()
        lb2 = await start_lb(nursery, [a, b], min_healthy_nodes=2)
        async with httpx.AsyncClient() as client:
            health = await client.get(f"{lb2.url}/health")
            assert health.status_code == 503
            assert health.json()["nodes_found"] == 1


async def test_model_list_refreshes(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], scan_interval=0.1)
        node.node.models = (MODEL, "new-model")
        client = sdk_for(lb)
        while "new-model" not in [m.id async for m in client.models.list()]:
            await trio.sleep(0.05)
        node.stop()
        # A node that stops answering leaves routing; its models stay listed, unavailable,
        # for MODEL_GRACE_SECS (a restarting node's clients get 503, not "no such model").
        while any((m.model_extra or {}).get("available", True)
                  for m in [m async for m in client.models.list()]):
            await trio.sleep(0.05)
