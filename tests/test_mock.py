"""The mock upstream node over real sockets, with the official openai SDK and httpx."""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import h11
import httpx
import openai
import orjson
import pytest
import trio
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.cli import main as cli_main
from lb.testing import FaultSpec, FaultSpecError, MockNode, parse_fault
from lb.testing.embeddings import cosine, embed, words

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "say hello to me"}]}


@asynccontextmanager
async def running(node: MockNode) -> AsyncIterator[str]:
    """Serve `node` on 127.0.0.1 and yield its base URL (no /v1)."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(node.serve, "127.0.0.1", 0)
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


def sdk(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)


async def sse_events(response: httpx.Response) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    body = b"".join([chunk async for chunk in response.aiter_bytes()])
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


async def wait_until(check: Callable[[], bool]) -> None:
    """Poll the node's counters (they have no events to wait on; the caller bounds the time)."""
    while not check():
        await trio.sleep(0.01)


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def open_narrow(port: int) -> trio.SocketStream:
    """A connection with a small receive buffer (set before connecting, which also turns the
    kernel's autotuning off): an answer of megabytes the client does not read stays unsent in
    the node's hands, whatever the machine's buffer settings."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


def h11_post(
    path: str, body: Any, headers: Sequence[tuple[str, str]] = ()
) -> tuple[h11.Connection, bytes]:
    """A client-side h11 connection and the bytes of one POST on it (`connection: close`, so
    that the node closes the connection after its answer)."""
    data = orjson.dumps(body)
    client = h11.Connection(h11.CLIENT)
    wire = client.send(h11.Request(method="POST", target=path, headers=[
        ("host", "127.0.0.1"), ("content-type", "application/json"),
        ("content-length", str(len(data))), ("connection", "close"), *headers,
    ]))
    wire += client.send(h11.Data(data=data)) + client.send(h11.EndOfMessage())
    return client, wire


async def read_to_eof(stream: trio.SocketStream, received: bytearray) -> bytes:
    while data := await stream.receive_some(65536):
        received += data
    await stream.aclose()
    return bytes(received)


def h11_answer(client: h11.Connection, raw: bytes) -> tuple[int, bytes, bool]:
    """Status, body and whether the body ended properly, for the bytes received up to EOF."""
    client.receive_data(raw)
    client.receive_data(b"")
    status, body, complete = 0, bytearray(), False
    try:
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                complete = True
            else:
                break
    except h11.RemoteProtocolError:  # the connection ended inside the body
        complete = False
    return status, bytes(body), complete


# -- API shapes ---------------------------------------------------------------------------------


async def test_models_openai_and_ollama() -> None:
    node = MockNode(models=["a", "b"], name="n1")
    with trio.fail_after(10):
        async with running(node) as base:
            page = await sdk(base).models.list()
            assert [m.id for m in page.data] == ["a", "b"]
            assert page.data[0].object == "model" and page.data[0].owned_by == "n1"
            async with httpx.AsyncClient() as http:
                tags = (await http.get(f"{base}/api/tags")).json()
                assert [m["name"] for m in tags["models"]] == ["a", "b"]
                assert tags["models"][0]["model"] == "a"
                assert (await http.get(f"{base}/health")).json() == {"status": "ok"}


async def test_chat_non_stream() -> None:
    node = MockNode(models=["x", "y"], tokens=5)
    with trio.fail_after(10):
        async with running(node) as base:
            answer = await sdk(base).chat.completions.create(
                model="y",
                messages=[
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
                ],
            )
    assert answer.object == "chat.completion"
    assert answer.model == "y"
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert choice.message.content is not None and len(choice.message.content.split()) == 5
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 5)
    assert answer.usage.total_tokens == 10


async def test_chat_stream_event_count_and_content() -> None:
    node = MockNode(tokens=8)
    with trio.fail_after(10):
        async with running(node) as base:
            async with httpx.AsyncClient() as http, http.stream(
                "POST", f"{base}/v1/chat/completions", json={**CHAT, "stream": True}
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                events = await sse_events(response)
            stream = await sdk(base).chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
            chunks = [chunk async for chunk in stream]
    assert len(events) == 1 + 8 + 1 + 1 and events[-1] == b"[DONE]"
    parsed = [orjson.loads(e) for e in events[:-1]]
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(p["object"] == "chat.completion.chunk" for p in parsed)
    assert len({p["id"] for p in parsed}) == 1
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(text.split()) == 8
    assert "usage" not in parsed[-1]


async def test_stream_include_usage_and_max_tokens() -> None:
    node = MockNode(tokens=8)
    body = {
        **CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3,
    }
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http, http.stream(
            "POST", f"{base}/v1/chat/completions", json=body
        ) as response:
            events = await sse_events(response)
    assert len(events) == 1 + 3 + 1 + 1 + 1
    finish, usage = orjson.loads(events[-3]), orjson.loads(events[-2])
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


async def test_text_completions() -> None:
    node = MockNode(tokens=4)
    with trio.fail_after(10):
        async with running(node) as base:
            client = sdk(base)
            answer = await client.completions.create(model="mock-model", prompt="a b c")
            stream = await client.completions.create(
                model="mock-model", prompt=["a", "b"], stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
    assert answer.object == "text_completion"
    assert len(answer.choices[0].text.split()) == 4
    assert answer.usage is not None and answer.usage.prompt_tokens == 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == answer.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


async def test_embeddings_share_words_closer() -> None:
    node = MockNode(embedding_dim=64)
    texts = ["the cat sat on the mat", "The cat sat on a mat!", "quantum chromodynamics lecture"]
    with trio.fail_after(10):
        async with running(node) as base:
            # The SDK asks for base64 by default; httpx asks for floats.
            result = await sdk(base).embeddings.create(model="mock-model", input=texts)
            async with httpx.AsyncClient() as http:
                floats = (await http.post(f"{base}/v1/embeddings", json={
                    "model": "mock-model", "input": "the cat sat on the mat", "dimensions": 16,
                })).json()
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [64, 64, 64]
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-5) for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert result.usage.prompt_tokens == 6 + 6 + 3
    assert len(floats["data"][0]["embedding"]) == 16
    assert floats["data"][0]["embedding"] == pytest.approx(embed("the cat sat on the mat", 16))


# -- errors -------------------------------------------------------------------------------------


async def test_unknown_model_404_and_bad_requests_400() -> None:
    node = MockNode()
    with trio.fail_after(10):
        async with running(node) as base:
            with pytest.raises(openai.NotFoundError) as caught:
                await sdk(base).chat.completions.create(
                    model="nope", messages=[{"role": "user", "content": "hi"}]
                )
            assert caught.value.code == "model_not_found"
            async with httpx.AsyncClient() as http:
                url = f"{base}/v1/chat/completions"
                bad_json = await http.post(url, content=b"{nope")
                no_messages = await http.post(url, json={"model": "mock-model"})
                no_prompt = await http.post(f"{base}/v1/completions", json={"model": "mock-model"})
    for response in (bad_json, no_messages, no_prompt):
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"


# -- faults -------------------------------------------------------------------------------------


async def test_status_fault_node_wide_and_at_run_time() -> None:
    node = MockNode(fault="status=503,retry-after=2")
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:
            url = f"{base}/v1/chat/completions"
            first = await http.post(url, json=CHAT)
            changed = await http.post(f"{base}/mock/fault", json={"fault": "status=429"})
            second = await http.post(url, json=CHAT)
            cleared = await http.post(f"{base}/mock/fault", json={"fault": ""})
            third = await http.post(url, json=CHAT)
            models = await http.get(f"{base}/v1/models")
            stats = (await http.get(f"{base}/mock/stats")).json()
    assert first.status_code == 503 and first.headers["retry-after"] == "2"
    assert first.json()["error"]["code"] == "mock_fault"
    assert changed.json() == {"fault": "status=429"}
    assert second.status_code == 429
    assert cleared.status_code == 200 and third.status_code == 200
    assert models.status_code == 200
    assert stats["faults_injected"] == 2 and stats["errors"] == 2


async def test_rate_is_reproducible_with_a_seed() -> None:
    async def statuses(node: MockNode) -> list[int]:
        async with running(node) as base, httpx.AsyncClient() as http:
            return [
                (await http.post(f"{base}/v1/chat/completions", json=CHAT)).status_code
                for _ in range(20)
            ]

    with trio.fail_after(10):
        one = await statuses(MockNode(fault="status=500,rate=0.5", seed=7))
        two = await statuses(MockNode(fault="status=500,rate=0.5", seed=7))
        node = MockNode(fault="status=500,rate=0.5", seed=7)
        await statuses(node)
        node.reset()
        three = await statuses(node)
    assert one == two == three
    assert set(one) == {200, 500}


async def test_hang_until_client_goes_away_counts_a_disconnect() -> None:
    node = MockNode()
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:
            with trio.move_on_after(0.3) as scope:
                await http.post(
                    f"{base}/v1/chat/completions", json=CHAT, headers={"x-mock-fault": "hang=1"}
                )
            assert scope.cancelled_caught
            await wait_until(lambda: node.stats.disconnects == 1)
            assert node.stats.concurrent == 0
            assert node.stats.completed == 0
            assert node.stats.faults_injected == 1


async def test_client_gone_mid_stream_counts_a_disconnect() -> None:
    node = MockNode(tokens=50, itl_ms=20)
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:
            async with http.stream(
                "POST", f"{base}/v1/chat/completions", json={**CHAT, "stream": True}
            ) as response:
                async for _ in response.aiter_bytes():
                    break
            await wait_until(lambda: node.stats.disconnects == 1)
            assert node.stats.concurrent == 0


async def test_drop_after_breaks_the_stream() -> None:
    node = MockNode(tokens=8)
    received = []
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:
            with pytest.raises(httpx.RemoteProtocolError):
                async with http.stream(
                    "POST", f"{base}/v1/chat/completions", json={**CHAT, "stream": True},
                    headers={"x-mock-fault": "drop-after=3"},
                ) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            received.append(line)
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post(
                    f"{base}/v1/chat/completions", json=CHAT,
                    headers={"x-mock-fault": "drop-after=0"},
                )
            # The node keeps serving other connections.
            ok = await http.post(f"{base}/v1/chat/completions", json=CHAT)
    assert len(received) == 3
    assert ok.status_code == 200
    assert node.stats.dropped == 2 and node.stats.concurrent == 0


async def test_header_overrides_and_wins_over_node_fault() -> None:
    node = MockNode(tokens=8, fault="status=503")
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:
            url = f"{base}/v1/chat/completions"
            short = await http.post(url, json=CHAT, headers={"x-mock-fault": "tokens=3"})
            plain = await http.post(url, json=CHAT, headers={"x-mock-fault": ""})
            faulted = await http.post(url, json=CHAT)
            start = trio.current_time()
            slow = await http.post(url, json=CHAT, headers={"x-mock-fault": "ttft-ms=150"})
            slow_elapsed = trio.current_time() - start
    assert short.status_code == 200
    assert short.json()["usage"]["completion_tokens"] == 3
    assert plain.status_code == 200 and faulted.status_code == 503
    assert slow.status_code == 200 and slow_elapsed >= 0.14


async def test_bad_fault_spec_is_a_400_naming_the_item() -> None:
    node = MockNode()
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:
            by_header = await http.post(
                f"{base}/v1/chat/completions", json=CHAT,
                headers={"x-mock-fault": "status=503,explode=1"},
            )
            by_control = await http.post(f"{base}/mock/fault", json={"fault": "rate=7"})
    assert by_header.status_code == 400 and "explode=1" in by_header.json()["error"]["message"]
    assert by_control.status_code == 400 and "rate=7" in by_control.json()["error"]["message"]
    with pytest.raises(ValueError, match="bogus"):
        MockNode(fault="bogus")


async def test_retry_after_with_429() -> None:
    node = MockNode(fault="status=429")
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:
            url = f"{base}/v1/chat/completions"
            bare = await http.post(url, json=CHAT)
            timed = await http.post(
                url, json=CHAT, headers={"x-mock-fault": "status=429,retry-after=7"}
            )
            with pytest.raises(openai.RateLimitError) as caught:
                await sdk(base).chat.completions.create(
                    model="mock-model", messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-mock-fault": "retry-after=30,status=429"},
                )
    assert bare.status_code == 429 and "retry-after" not in bare.headers
    assert timed.status_code == 429 and timed.headers.get_list("retry-after") == ["7"]
    assert timed.json()["error"]["type"] == "rate_limit_error"
    assert caught.value.response.headers["retry-after"] == "30"


@pytest.mark.parametrize("itl_ms", [0, 5])
async def test_drop_after_done_ends_the_stream_without_the_last_chunk(itl_ms: int) -> None:
    node = MockNode(tokens=3, itl_ms=itl_ms)
    stream_body = {**CHAT, "stream": True}
    with trio.fail_after(10):
        async with running(node) as base:
            port = port_of(base)
            answers = []
            for fault in ("drop-after-done=1", ""):
                client, wire = h11_post(
                    "/v1/chat/completions", stream_body, [("x-mock-fault", fault)]
                )
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(wire)
                raw = await read_to_eof(stream, bytearray())
                answers.append((raw, *h11_answer(client, raw)))
            # Not a stream: the fault changes nothing.
            client, wire = h11_post(
                "/v1/chat/completions", CHAT, [("x-mock-fault", "drop-after-done=1")]
            )
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(wire)
            plain = h11_answer(client, await read_to_eof(stream, bytearray()))
    (raw, status, body, complete), (raw_ok, status_ok, body_ok, complete_ok) = answers
    assert status == status_ok == 200
    # Every event, [DONE] included, then the connection ends without the `0\r\n\r\n` chunk.
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 1 + 3 + 1 + 1 and events[-1] == b"data: [DONE]"
    assert body.endswith(b"data: [DONE]\n\n") and not complete
    assert raw.endswith(b"data: [DONE]\n\n\r\n") and not raw.endswith(b"0\r\n\r\n")
    # Without the fault the same answer ends properly.
    assert body_ok.endswith(b"data: [DONE]\n\n") and complete_ok
    assert raw_ok.endswith(b"\r\n0\r\n\r\n")
    assert plain[0] == 200 and plain[2] and orjson.loads(plain[1])["choices"]
    assert node.stats.dropped == 1 and node.stats.completed == 2 and node.stats.concurrent == 0


# -- quirks of real nodes -----------------------------------------------------------------------


GENERATIONS = [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "mock-model", "prompt": "say hello"}),
    ("/v1/embeddings", {"model": "mock-model", "input": "say hello"}),
]


@pytest.mark.parametrize(("path", "body"), GENERATIONS)
async def test_busy_probes_wait_until_no_generation_is_in_flight(
    path: str, body: dict[str, Any]
) -> None:
    node = MockNode(busy_probes=True)
    answered: list[tuple[int, int]] = []
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:

            async def probe() -> None:
                response = await http.get(f"{base}/v1/models")
                answered.append((response.status_code, node.stats.disconnects))

            async with trio.open_nursery() as nursery:
                generation = trio.CancelScope()

                async def generate() -> None:
                    with generation:
                        await http.post(
                            f"{base}{path}", json=body, headers={"x-mock-fault": "hang"}
                        )

                nursery.start_soon(generate)
                await wait_until(lambda: node.stats.concurrent == 1)
                for probed in ("/v1/models", "/api/tags"):
                    with pytest.raises(httpx.TimeoutException):
                        await http.get(f"{base}{probed}", timeout=0.2)
                assert (await http.get(f"{base}/health")).status_code == 200
                await wait_until(lambda: node.stats.disconnects == 2)  # the probes that gave up
                nursery.start_soon(probe)
                await wait_until(lambda: node.stats.concurrent == 2)
                assert answered == []
                generation.cancel()  # its client leaves: the generation ends
            tags = await http.get(f"{base}/api/tags")
    # The waiting probe answered, and only once the generation had ended.
    assert answered == [(200, 3)]
    assert tags.status_code == 200
    assert node.stats.concurrent == 0


async def test_busy_probes_wait_for_a_stream_to_end() -> None:
    node = MockNode(busy_probes=True)
    answered: list[tuple[int, int]] = []
    # About 15 MB of events, far more than the kernel buffers can hold while the client reads
    # nothing: the node is still writing the answer until the client reads it all.
    client, wire = h11_post(
        "/v1/chat/completions", {**CHAT, "stream": True}, [("x-mock-fault", "tokens=100000")]
    )
    with trio.fail_after(20):
        async with running(node) as base, httpx.AsyncClient() as http:

            async def probe() -> None:
                response = await http.get(f"{base}/v1/models")
                answered.append((response.status_code, node.stats.completed))

            async with trio.open_nursery() as nursery:
                stream = await open_narrow(port_of(base))
                await stream.send_all(wire)
                received = bytearray()
                while b"\r\n\r\n" not in received:  # the head, and the first events
                    received += await stream.receive_some(65536)
                assert received.startswith(b"HTTP/1.1 200 ")
                assert node.stats.concurrent == 1 and node.stats.completed == 0
                with pytest.raises(httpx.TimeoutException):
                    await http.get(f"{base}/v1/models", timeout=0.2)
                await wait_until(lambda: node.stats.disconnects == 1)
                nursery.start_soon(probe)
                await wait_until(lambda: node.stats.concurrent == 2)
                assert answered == []
                raw = await read_to_eof(stream, received)
    status, body, complete = h11_answer(client, raw)
    assert status == 200 and complete and body.endswith(b"data: [DONE]\n\n")
    # The probe answered after the stream was complete (which counts before the probe does).
    assert answered == [(200, 2)]


async def test_probes_answer_during_a_generation_by_default() -> None:
    node = MockNode()
    with trio.fail_after(10):
        async with (
            running(node) as base, httpx.AsyncClient() as http, trio.open_nursery() as nursery
        ):

            async def generate() -> None:
                await http.post(
                    f"{base}/v1/chat/completions", json=CHAT, headers={"x-mock-fault": "hang"}
                )

            nursery.start_soon(generate)
            await wait_until(lambda: node.stats.concurrent == 1)
            models = await http.get(f"{base}/v1/models", timeout=5)
            tags = await http.get(f"{base}/api/tags", timeout=5)
            nursery.cancel_scope.cancel()
    assert models.status_code == 200 and tags.status_code == 200


async def test_strict_request_id_refuses_ids_that_are_not_uuids() -> None:
    strict, lenient = MockNode(strict_request_id=True), MockNode()
    good = str(uuid.uuid4())
    with trio.fail_after(10):
        async with running(strict) as base, running(lenient) as other, httpx.AsyncClient() as http:
            url = f"{base}/v1/chat/completions"
            refused = await http.post(url, json=CHAT, headers={"x-request-id": "trace-42"})
            embeddings = await http.post(
                f"{base}/v1/embeddings", json={"model": "mock-model", "input": "x"},
                headers={"x-request-id": "not-a-uuid"},
            )
            accepted = await http.post(url, json=CHAT, headers={"x-request-id": good})
            no_id = await http.post(url, json=CHAT)
            probe = await http.get(f"{base}/v1/models", headers={"x-request-id": "trace-42"})
            elsewhere = await http.post(
                f"{other}/v1/chat/completions", json=CHAT, headers={"x-request-id": "trace-42"}
            )
            seen = (await http.get(f"{base}/mock/requests")).json()
    for response in (refused, embeddings):
        assert response.status_code == 400
        assert response.content == b"" and response.headers["content-length"] == "0"
    assert accepted.status_code == 200 and accepted.json()["choices"]
    assert no_id.status_code == 200 and probe.status_code == 200
    assert elsewhere.status_code == 200
    assert strict.stats.errors == 2 and strict.stats.completed == 5
    assert seen[0]["headers"]["x-request-id"] == "trace-42"  # refused, but recorded


async def test_max_completion_tokens_honoured_or_ignored() -> None:
    honours, ignores = MockNode(tokens=8), MockNode(tokens=8, honours_max_completion_tokens=False)
    limits: list[dict[str, Any]] = [
        {"max_completion_tokens": 2}, {"max_tokens": 3},
        {"max_completion_tokens": 2, "max_tokens": 5},
    ]

    async def lengths(node: MockNode) -> list[tuple[int, str]]:
        async with running(node) as base, httpx.AsyncClient() as http:
            out = []
            for limit in limits:
                answer = (await http.post(
                    f"{base}/v1/chat/completions", json={**CHAT, **limit}
                )).json()
                out.append((
                    answer["usage"]["completion_tokens"], answer["choices"][0]["finish_reason"]
                ))
            text = (await http.post(f"{base}/v1/completions", json={
                "model": "mock-model", "prompt": "x", "max_completion_tokens": 1,
            })).json()
            out.append((text["usage"]["completion_tokens"], text["choices"][0]["finish_reason"]))
            return out

    with trio.fail_after(10):
        honoured, ignored = await lengths(honours), await lengths(ignores)
    assert honoured == [(2, "length"), (3, "length"), (2, "length"), (1, "length")]
    assert ignored == [(8, "stop"), (3, "length"), (5, "length"), (8, "stop")]


def test_mock_command_passes_the_quirk_options(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[MockNode] = []

    async def serve(self: MockNode, host: str, port: int, *, task_status: Any) -> None:
        made.append(self)
        task_status.started(port)

    monkeypatch.setattr(MockNode, "serve", serve)
    runner = CliRunner()
    plain = runner.invoke(cli_main, ["mock", "--port", "1"])
    quirky = runner.invoke(cli_main, [
        "mock", "--port", "2", "--busy-probes", "--strict-request-id",
        "--ignore-max-completion-tokens",
    ])
    assert plain.exit_code == 0 and quirky.exit_code == 0, (plain.output, quirky.output)
    assert "listening on http://127.0.0.1:2" in quirky.output
    options = [(n.busy_probes, n.strict_request_id, n.honours_max_completion_tokens) for n in made]
    assert options == [(False, False, True), (True, True, False)]


# -- counters and recording ---------------------------------------------------------------------


async def test_stats_reset_and_recorded_requests() -> None:
    node = MockNode()
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:
            await http.get(f"{base}/v1/models")
            await http.post(
                f"{base}/v1/chat/completions",
                json={**CHAT, "optillm_approach": "moa"}, headers={"x-trace": "t1"},
            )
            stats = (await http.get(f"{base}/mock/stats")).json()
            seen = (await http.get(f"{base}/mock/requests")).json()
            await http.post(f"{base}/mock/reset")
            after = (await http.get(f"{base}/mock/stats")).json()
            seen_after = (await http.get(f"{base}/mock/requests")).json()
    assert stats["requests"] == 2 and stats["completed"] == 2
    assert stats["by_path"] == {"/v1/models": 1, "/v1/chat/completions": 1}
    assert stats["concurrent"] == 0 and stats["max_concurrent"] == 1
    assert seen[-1]["body"]["optillm_approach"] == "moa"
    assert seen[-1]["body"]["model"] == "mock-model"
    assert seen[-1]["headers"]["x-trace"] == "t1"
    assert after["requests"] == 0 and after["by_path"] == {} and seen_after == []


async def test_recorded_headers_are_as_received() -> None:
    node = MockNode()
    request_id = str(uuid.uuid4())
    client, wire = h11_post("/v1/chat/completions", CHAT, [
        ("X-Trace", "t1"), ("x-request-id", request_id), ("x-dup", "b"), ("x-dup", "a, c"),
        ("authorization", "Bearer  k"),
    ])
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(base))
            await stream.send_all(wire)
            status, _, _ = h11_answer(client, await read_to_eof(stream, bytearray()))
            probe = await http.get(f"{base}/v1/models", headers={"x-probe": "1"})
            seen = (await http.get(f"{base}/mock/requests")).json()
    assert status == 200 and probe.status_code == 200
    chat, models = seen
    assert chat["raw_headers"] == [
        ["host", "127.0.0.1"], ["content-type", "application/json"],
        ["content-length", str(len(orjson.dumps(CHAT)))], ["connection", "close"],
        ["x-trace", "t1"], ["x-request-id", request_id], ["x-dup", "b"], ["x-dup", "a, c"],
        ["authorization", "Bearer  k"],
    ]
    assert chat["headers"]["x-request-id"] == request_id
    assert chat["headers"]["x-dup"] == "b, a, c"
    assert chat["headers"]["authorization"] == "Bearer  k"
    assert (models["method"], models["path"], models["headers"]["x-probe"]) == (
        "GET", "/v1/models", "1"
    )


async def test_max_concurrent_with_slow_requests() -> None:
    node = MockNode(ttft_ms=300)
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:

            async def one() -> None:
                response = await http.post(f"{base}/v1/chat/completions", json=CHAT)
                assert response.status_code == 200

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(one)
                await wait_until(lambda: node.stats.concurrent == 5)
    assert node.stats.max_concurrent == 5
    assert node.stats.concurrent == 0 and node.stats.completed == 5


async def test_stream_timing_knobs() -> None:
    node = MockNode(tokens=4, ttft_ms=100, itl_ms=30)
    with trio.fail_after(10):
        async with running(node) as base, httpx.AsyncClient() as http:
            start = trio.current_time()
            async with http.stream(
                "POST", f"{base}/v1/chat/completions", json={**CHAT, "stream": True}
            ) as response:
                events = await sse_events(response)
            elapsed = trio.current_time() - start
    assert len(events) == 1 + 4 + 1 + 1
    assert elapsed >= 0.1 + 3 * 0.03 - 0.01


# -- pure parts ---------------------------------------------------------------------------------

specs = st.builds(
    FaultSpec,
    status=st.none() | st.integers(400, 599),
    rate=st.floats(0, 1, allow_nan=False),
    hang=st.booleans(),
    drop_after=st.none() | st.integers(0, 1000),
    drop_after_done=st.booleans(),
    ttft_ms=st.none() | st.floats(0, 1e6, allow_nan=False),
    itl_ms=st.none() | st.floats(0, 1e6, allow_nan=False),
    tokens=st.none() | st.integers(0, 100_000),
    retry_after=st.none() | st.integers(0, 3600),
    error_after=st.none() | st.integers(0, 1000),
)


# No deadline: a loaded CI machine must not turn a slow example into a failure.
pure = settings(deadline=None)


@pure
@given(specs)
def test_fault_spec_round_trips(spec: FaultSpec) -> None:
    assert parse_fault(spec.format()) == spec


@pure
@given(specs, st.randoms(use_true_random=False))
def test_fault_spec_item_order_and_blanks_do_not_matter(spec: FaultSpec, rnd: Any) -> None:
    items = spec.format().split(",")
    rnd.shuffle(items)
    assert parse_fault(" , ".join(items) + ",") == spec


@pure
@given(st.text(max_size=40))
def test_fault_parser_only_raises_its_own_error(text: str) -> None:
    try:
        spec = parse_fault(text)
    except FaultSpecError as exc:
        assert exc.item and exc.item in text
    else:
        assert isinstance(spec, FaultSpec)


def test_fault_parser_examples() -> None:
    assert parse_fault("hang") == FaultSpec(hang=True)
    assert parse_fault("drop_after=2, TTFT-MS=5") == FaultSpec(drop_after=2, ttft_ms=5.0)
    assert parse_fault("").empty and parse_fault("rate=0.5").empty
    assert not parse_fault("tokens=1").empty
    assert parse_fault("drop_after_done=1") == FaultSpec(drop_after_done=True)
    assert parse_fault("drop-after=3,drop-after-done=0") == FaultSpec(drop_after=3)
    assert not parse_fault("drop-after-done=yes").empty
    assert FaultSpec(drop_after_done=True).format() == "drop-after-done=1"
    for bad in (
        "status=200", "rate=1.5", "tokens=-1", "x", "status=500,status=502", "itl-ms=inf",
        "drop-after-done=2", "drop-after-done",
    ):
        with pytest.raises(FaultSpecError) as caught:
            parse_fault(bad)
        assert caught.value.item in bad


word_lists = st.lists(st.from_regex(r"[a-z]{3,8}", fullmatch=True), min_size=3, max_size=6,
                      unique=True)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=60), st.sampled_from([8, 64, 256]))
def test_embeddings_deterministic_unit_vectors(text: str, dim: int) -> None:
    vector = embed(text, dim)
    assert vector == embed(text, dim)
    assert len(vector) == dim
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-9)


@settings(max_examples=50, deadline=None)
@given(word_lists, word_lists)
def test_embeddings_shared_words_are_closer(shared: list[str], other: list[str]) -> None:
    other = [w for w in other if w not in shared]
    if not other:
        return
    a = embed(" ".join([*shared, "alpha"]), 256)
    b = embed(" ".join([*shared, "omega"]), 256)
    c = embed(" ".join(other), 256)
    assert cosine(a, b) > cosine(a, c)


def test_embeddings_ignore_case_and_punctuation() -> None:
    assert words("Hello, World!") == ["hello", "world"]
    assert embed("Hello, World!", 32) == embed("hello world", 32)


# -- prefix cache and capacity model, on trio's autojump clock --------------------------------


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def cache_node(**kwargs: Any) -> MockNode:
    """TTFT 10 ms plus 100 ms per uncached KiB; no gap between tokens, so that a non-stream
    answer takes exactly its TTFT."""
    options: dict[str, Any] = {"ttft_ms": 10, "prefix_cache": True, "prefill_ms_per_kb": 100}
    return MockNode(**(options | kwargs))


async def answer_time(
    client: httpx.AsyncClient, base: str, path: str, body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> float:
    """Virtual seconds a non-stream answer takes."""
    start = trio.current_time()
    response = await client.post(f"{base}{path}", json=body, headers=headers)
    assert response.status_code == 200
    return trio.current_time() - start


async def completion_time(client: httpx.AsyncClient, base: str, prompt: str) -> float:
    return await answer_time(
        client, base, "/v1/completions", {"model": "mock-model", "prompt": prompt}
    )


async def cache_stats(client: httpx.AsyncClient, base: str) -> dict[str, int]:
    stats: dict[str, int] = (await client.get(f"{base}/mock/stats")).json()["prefix_cache"]
    return stats


async def test_a_repeated_prompt_is_answered_sooner(autojump_clock: Any) -> None:
    async with running(cache_node()) as base, httpx.AsyncClient(timeout=None) as client:
        assert await completion_time(client, base, "a" * 2048) == pytest.approx(0.210)
        assert await completion_time(client, base, "a" * 2048) == pytest.approx(0.010)


async def test_an_extended_prompt_pays_only_for_its_new_bytes(autojump_clock: Any) -> None:
    async with running(cache_node()) as base, httpx.AsyncClient(timeout=None) as client:
        assert await completion_time(client, base, "a" * 2048) == pytest.approx(0.210)
        # 1 KiB more: 100 ms of prefill, not 300.
        assert await completion_time(client, base, "a" * 2048 + "b" * 1024) == pytest.approx(
            0.110
        )
        # A prompt cut inside a cached block: its whole blocks are cached, the short last one
        # is not (its hash covers fewer bytes), so it pays for 128 bytes.
        assert await completion_time(client, base, "a" * 1152) == pytest.approx(0.0225)


async def test_a_different_prompt_pays_in_full(autojump_clock: Any) -> None:
    async with running(cache_node()) as base, httpx.AsyncClient(timeout=None) as client:
        assert await completion_time(client, base, "a" * 2048) == pytest.approx(0.210)
        assert await completion_time(client, base, "c" * 2048) == pytest.approx(0.210)
        # The same bytes after a different first block: the chain differs, nothing is cached.
        assert await completion_time(client, base, "c" + "a" * 2047) == pytest.approx(0.210)


async def test_chat_prompts_share_a_system_prompt(autojump_clock: Any) -> None:
    """A chat prompt is each message's role, newline, text, newline: a 1016-byte system
    message is 1024 bytes, 4 whole blocks, and a 250-byte user message one more block."""
    system = {"role": "system", "content": "s" * 1016}

    def chat(user: str) -> dict[str, Any]:
        return {"model": "mock-model", "messages": [system, {"role": "user", "content": user}]}

    async with running(cache_node()) as base, httpx.AsyncClient(timeout=None) as client:
        path = "/v1/chat/completions"
        assert await answer_time(client, base, path, chat("x" * 250)) == pytest.approx(0.135)
        # Same system prompt, another question: only the user's 256 bytes are new.
        assert await answer_time(client, base, path, chat("y" * 250)) == pytest.approx(0.035)
        # The same text under another role is another prompt ("user\n", 1018 bytes, "\n").
        other = {"model": "mock-model", "messages": [{"role": "user", "content": "s" * 1018}]}
        assert await answer_time(client, base, path, other) == pytest.approx(0.110)


async def test_a_streamed_answer_fills_the_cache_too(autojump_clock: Any) -> None:
    body = {"model": "mock-model", "prompt": "a" * 1024, "stream": True}
    async with running(cache_node()) as base, httpx.AsyncClient(timeout=None) as client:
        for expected in (0.110, 0.010):
            start = trio.current_time()
            async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
                events = await sse_events(response)
            assert events[-1] == b"[DONE]"
            assert trio.current_time() - start == pytest.approx(expected)


async def test_the_cache_is_a_bounded_lru(autojump_clock: Any) -> None:
    node = cache_node(cache_entries=4)
    async with running(node) as base, httpx.AsyncClient(timeout=None) as client:
        assert await completion_time(client, base, "a" * 1024) == pytest.approx(0.110)
        assert await completion_time(client, base, "a" * 1024) == pytest.approx(0.010)
        assert (await cache_stats(client, base))["entries"] == 4
        # Four other blocks push A's four out...
        assert await completion_time(client, base, "b" * 1024) == pytest.approx(0.110)
        assert (await cache_stats(client, base))["entries"] == 4
        # ...so A pays in full again, and pushes B out in turn.
        assert await completion_time(client, base, "a" * 1024) == pytest.approx(0.110)
        assert await completion_time(client, base, "b" * 1024) == pytest.approx(0.110)
        # A prompt longer than the cache leaves only its last blocks, which no lookup reaches.
        assert await completion_time(client, base, "c" * 2048) == pytest.approx(0.210)
        assert await completion_time(client, base, "c" * 2048) == pytest.approx(0.210)
        assert (await cache_stats(client, base))["entries"] == 4


async def test_stats_report_cache_hits_and_misses(autojump_clock: Any) -> None:
    async with running(cache_node()) as base, httpx.AsyncClient(timeout=None) as client:
        assert await cache_stats(client, base) == {"hits_bytes": 0, "miss_bytes": 0, "entries": 0}
        await completion_time(client, base, "a" * 2048)
        await completion_time(client, base, "a" * 2048)
        await completion_time(client, base, "a" * 2048 + "b" * 1024)
        await completion_time(client, base, "c" * 100)
        assert await cache_stats(client, base) == {
            "hits_bytes": 2048 + 2048, "miss_bytes": 2048 + 1024 + 100, "entries": 8 + 4 + 1,
        }
        await client.post(f"{base}/mock/reset")
        assert await cache_stats(client, base) == {"hits_bytes": 0, "miss_bytes": 0, "entries": 0}
        # Reset empties the cache: the prompt pays in full again.
        assert await completion_time(client, base, "a" * 2048) == pytest.approx(0.210)
    async with running(MockNode()) as base, httpx.AsyncClient(timeout=None) as client:
        assert "prefix_cache" not in (await client.get(f"{base}/mock/stats")).json()


async def test_without_the_cache_a_repeated_prompt_costs_the_same(autojump_clock: Any) -> None:
    node = cache_node(prefix_cache=False)
    async with running(node) as base, httpx.AsyncClient(timeout=None) as client:
        assert await completion_time(client, base, "a" * 2048) == pytest.approx(0.010)
        assert await completion_time(client, base, "a" * 2048) == pytest.approx(0.010)


@pytest.mark.parametrize("held", [0, 1, 3])
async def test_ttft_grows_with_the_requests_in_flight(autojump_clock: Any, held: int) -> None:
    node = MockNode(ttft_ms=10, ttft_per_inflight_ms=50)
    async with running(node) as base, httpx.AsyncClient(timeout=None) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(held):
                nursery.start_soon(functools.partial(
                    client.post, f"{base}/v1/chat/completions", json=CHAT,
                    headers={"x-mock-fault": "hang=1"},
                ))
            await wait_until(lambda: node.stats.concurrent == held)
            elapsed = await answer_time(client, base, "/v1/chat/completions", CHAT)
            assert elapsed == pytest.approx(0.010 + 0.050 * held)
            nursery.cancel_scope.cancel()
        # Once they are gone, TTFT is back to its base.
        await wait_until(lambda: node.stats.concurrent == 0)
        assert await answer_time(client, base, "/v1/chat/completions", CHAT) == pytest.approx(
            0.010
        )


def test_cli_mock_takes_the_cache_and_capacity_options() -> None:
    result = CliRunner().invoke(cli_main, ["mock", "--help"])
    assert result.exit_code == 0
    for flag in ("--prefix-cache", "--prefill-ms-per-kb", "--cache-entries",
                 "--ttft-per-inflight-ms"):
        assert flag in result.output
    bad = CliRunner().invoke(cli_main, ["mock", "--cache-entries", "0"])
    assert bad.exit_code != 0
