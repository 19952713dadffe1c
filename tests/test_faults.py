"""Faults found by trying lb as an attacker, a careless client and a broken node would, end to
end over real sockets: what the client gets, what the node saw, and that lb keeps serving.
(Stream faults are in test_faults_stream.py; the same rules on a fake node in test_dispatch.py.)
"""

from __future__ import annotations

import resource
import uuid
from typing import Any

import httpx
import orjson
import trio
from harness import CHAT, Running, json_answer, read_body, start_lb, start_mock, start_scripted

MODEL = "llama-3.1-8b"
ADMIN = {"authorization": "Bearer s3cret"}


async def chat(lb: Running, **options: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT}, **options
        )


async def node_view(lb: Running, key: str) -> dict[str, Any]:
    async with httpx.AsyncClient(headers=ADMIN) as client:
        nodes = (await client.get(f"{lb.url}/v1/nodes")).json()["nodes"]
    found: dict[str, Any] = next(node for node in nodes if node["node"] == key)
    return found


async def test_one_bad_request_does_not_open_a_lone_nodes_breaker(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], breaker_threshold=2, admin_key="s3cret")
        answer = await chat(lb, headers={"x-mock-fault": "status=500"})
        assert answer.status_code == 502
        error = answer.json()["error"]
        assert error["code"] == "all_upstreams_failed"
        # The node's own words, by host:port: no retry on it (it would fail the same way).
        assert error["message"] == (
            f"All 1 attempt(s) failed: {node.key}: HTTP 500: "
            f"Injected fault: status 500 from mock node {node.node.name}"
        )
        assert await node.chats() == 1
        view = await node_view(lb, node.key)
        assert view["failures"] == 1 and view["breaker"] == "closed"
        assert view["last_error"].startswith("HTTP 500: Injected fault")
        assert (await chat(lb)).status_code == 200


async def test_a_long_non_stream_generation_is_not_cut_by_the_attempt_timeout(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], attempt_timeout=0.2, admin_key="s3cret")
        answer = await chat(lb, headers={"x-mock-fault": "ttft-ms=800"})
        assert answer.status_code == 200 and answer.json()["choices"]
        assert await node.chats() == 1
        assert (await node_view(lb, node.key))["failures"] == 0


async def test_every_answer_carries_a_request_id(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient(base_url=lb.url) as client:
            answers = [
                await client.get("/nope"),
                await client.delete("/v1/models"),
                await client.post("/v1/chat/completions", content=b"{not json"),
                await client.post("/v1/chat/completions", json={"model": "gpt-9", **CHAT}),
                await client.post("/v1/chat/completions", json={"model": MODEL, **CHAT}),
            ]
            assert [a.status_code for a in answers] == [404, 405, 400, 404, 200]
            ids = [a.headers["x-request-id"] for a in answers]
            assert all(ids) and len(set(ids)) == len(ids)
            given = await client.get("/nope", headers={"x-request-id": "trace-42"})
            assert given.headers.get_list("x-request-id") == ["trace-42"]
            traced = "0b7c7e2e-8a9f-4c5d-9e1f-2a3b4c5d6e7f"
            await client.post("/v1/chat/completions", json={"model": MODEL, **CHAT},
                              headers={"x-request-id": traced})
            await client.post("/v1/chat/completions", json={"model": MODEL, **CHAT},
                              headers={"x-request-id": "trace-42"})
        # The node gets the id lb answered with, shaped as a UUID (lb's own are), since some
        # nodes refuse any other shape; a client's id of another shape is not sent on.
        seen = [dict(request["headers"]) for request in await node.requests()]
        assert seen[-3]["x-request-id"] == ids[-1]
        uuid.UUID(ids[-1])
        assert seen[-2]["x-request-id"] == traced
        assert "x-request-id" not in seen[-1]


async def test_request_ids_with_control_characters_are_refused_not_reflected(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        for bad in (b"a\tb", b"caf\xc3\xa9", b"x" * 129, b"a b"):
            reply = await raw_request(lb, b"x-request-id: " + bad + b"\r\n")
            assert reply.startswith(b"HTTP/1.1 400 "), reply[:100]
            assert b'"code":"invalid_header"' in reply and bad not in reply
        reply = await raw_request(lb, b"x-session-id: a\tb\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ") and b'"param":"x-session-id"' in reply
        assert await node.chats() == 0
        assert (await chat(lb)).status_code == 200


async def raw_request(lb: Running, extra_headers: bytes) -> bytes:
    body = orjson.dumps({"model": MODEL, **CHAT})
    stream = await trio.open_tcp_stream("127.0.0.1", lb.port)
    async with stream:
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + extra_headers
            + b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body
        )
        received = b""
        while data := await stream.receive_some(65536):
            received += data
    return received


async def test_headers_lb_sets_are_never_duplicated_by_the_nodes(nursery: trio.Nursery) -> None:
    async def answer_with_own_headers(
        head: bytes, stream: trio.SocketStream, buffered: bytearray
    ) -> None:
        await read_body(stream, head, buffered)
        body = b'{"choices": []}'
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"x-request-id: node-own\r\nx-routed-node: 10.9.9.9:1\r\nx-attempts: 7\r\n"
            b"x-selected-model: other\r\nx-node-extra: kept\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    with trio.fail_after(10):
        node = await start_scripted(nursery, answer_with_own_headers)
        lb = await start_lb(nursery, [node])
        answer = await chat(lb, headers={"x-request-id": "mine"})
        assert answer.status_code == 200
        assert answer.headers.get_list("x-request-id") == ["mine"]
        assert answer.headers.get_list("x-routed-node") == [node.key]
        assert answer.headers.get_list("x-attempts") == ["1"]
        assert answer.headers.get_list("x-selected-model") == [MODEL]
        assert answer.headers["x-node-extra"] == "kept"
        assert answer.headers["x-upstream-request-id"] == "node-own"  # the node's, renamed


async def test_headers_named_in_connection_are_not_forwarded(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        reply = await raw_request(
            lb, b"connection: x-hop-secret\r\nx-hop-secret: 1\r\nx-end-to-end: 2\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200 ")
        sent = dict((await node.requests())[-1]["headers"])
        assert "x-hop-secret" not in sent and sent["x-end-to-end"] == "2"


async def test_the_topology_needs_the_admin_key_once_one_is_set(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], admin_key="s3cret")
        views = [
            "/v1/nodes", f"/v1/eligible_nodes?model={MODEL}",
            f"/v1/debug/eligible?model={MODEL}", "/v1/debug/services",
        ]
        async with httpx.AsyncClient(base_url=lb.url) as client:
            for path in views:
                refused = await client.get(path)
                assert refused.status_code == 401, path
                assert refused.json()["error"]["code"] == "invalid_api_key"
                assert node.key not in refused.text
                assert (await client.get(path, headers=ADMIN)).status_code == 200, path
            assert (await client.get("/v1/models")).status_code == 200  # clients need this


async def test_lb_out_of_file_descriptors_is_503_and_not_the_nodes_failure(
    nursery: trio.Nursery,
) -> None:
    """EMFILE while connecting to a node is lb's own limit: 503 lb_overloaded, no verdict."""
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], breaker_threshold=1, admin_key="s3cret")
        body = orjson.dumps({"model": MODEL, **CHAT})
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
            b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        client = await trio.open_tcp_stream("127.0.0.1", lb.port)  # accepted by lb now
        await trio.sleep(0.1)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # This process (lb, the mock, the client) may open no more descriptors (the limit is
        # below what it has open): lb's connection to the node fails with EMFILE.
        resource.setrlimit(resource.RLIMIT_NOFILE, (8, hard))
        try:
            await client.send_all(request)
            received = b""
            while b"\r\n\r\n" not in received or not received.endswith(b"}"):
                received += await client.receive_some(65536)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await client.aclose()
        assert received.startswith(b"HTTP/1.1 503 "), received[:200]
        assert b'"code":"lb_overloaded"' in received and b"retry-after: 1" in received
        view = await node_view(lb, node.key)
        assert view["failures"] == 0 and view["breaker"] == "closed"
        assert (await chat(lb)).status_code == 200


async def test_failure_messages_name_nodes_by_host_port_only(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], max_retries=0)
        node.stop()
        await trio.sleep(0.05)
        answer = await chat(lb)
        assert answer.status_code == 502
        message = answer.json()["error"]["message"]
        assert message == f"All 1 attempt(s) failed: {node.key}: cannot connect"


async def test_an_early_answer_while_the_body_is_sent_reaches_the_client(
    nursery: trio.Nursery,
) -> None:
    """RFC 9112 §9.5: a node that answers 413 and closes before reading a large body gives
    the client that 413, not a 502, and is not charged a failure."""
    too_large = {"error": {"message": "request too large for this node", "code": 413}}

    async def refuse_unread(head: bytes, stream: trio.SocketStream, buffered: bytearray) -> None:
        # Answer without reading the body, then close: the unread bytes make it a reset.
        await stream.send_all(json_answer(too_large, "413 Payload Too Large"))

    with trio.fail_after(10):
        node = await start_scripted(nursery, refuse_unread)
        lb = await start_lb(nursery, [node], admin_key="s3cret")
        big = "word " * 1_000_000  # 5 MB: far more than the socket buffers hold
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(
                f"{lb.url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": big}]},
            )
        assert answer.status_code == 413
        assert answer.json() == too_large
        assert (await node_view(lb, node.key))["failures"] == 0
