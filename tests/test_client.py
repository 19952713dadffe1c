"""`lb.client`: retries, backoff, Retry-After, the end-to-end budget, the client-side circuit
breaker and the routing hints, against lb over real sockets with faults injected."""

from __future__ import annotations

import random
from typing import Any

import openai
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from lb.client import (
    AsyncLBClient,
    CircuitBreaker,
    CircuitOpen,
    ClientSettings,
    LBClient,
    backoff,
)
from tests.harness import CHAT, json_answer, read_body, start_lb, start_scripted

ANSWER = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}],
}
ERROR = {"error": {"message": "boom", "type": "server_error"}}


class Node:
    """A scripted node that fails its first `failures` chat requests with `status`."""

    def __init__(self, failures: int, status: str = "500 Internal Server Error",
                 extra: str = "") -> None:
        self.failures, self.status, self.extra = failures, status, extra
        self.heads: list[bytes] = []

    async def __call__(self, head: bytes, stream: trio.SocketStream, buffered: bytearray) -> None:
        await read_body(stream, head, buffered)
        self.heads.append(head)
        if len(self.heads) <= self.failures:
            answer = json_answer(ERROR, self.status)
            if self.extra:
                answer = answer.replace(b"\r\n\r\n", f"\r\n{self.extra}\r\n\r\n".encode(), 1)
            await stream.send_all(answer)
        else:
            await stream.send_all(json_answer(ANSWER))

    def header(self, index: int, name: str) -> str | None:
        for line in self.heads[index].split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.encode():
                return value.strip().decode()
        return None


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def client(lb_url: str, sleeps: Sleeps, **settings: Any) -> AsyncLBClient:
    return AsyncLBClient(
        settings=ClientSettings(**settings), sleep=sleeps, rng=random.Random(1),
        base_url=f"{lb_url}/v1", api_key="k",
    )


async def test_a_failed_attempt_is_retried_with_hints(nursery: trio.Nursery) -> None:
    node = Node(failures=1)
    lb = await start_lb(nursery, [await start_scripted(nursery, node, ("m",))], max_retries=0,
                        breaker_threshold=0)
    sleeps = Sleeps()
    answer = await client(lb.url, sleeps, attempts=2, budget=30).chat(
        model="m", session_id="user-42", prefer_small=True, **CHAT
    )
    assert answer.choices[0].message.content == "hi"
    assert len(node.heads) == 2 and len(sleeps.waits) == 1
    assert 0 <= sleeps.waits[0] <= 0.2
    assert node.header(1, "x-session-id") == "user-42"
    assert node.header(1, "x-prefer-small") == "1"
    budget = node.header(1, "x-request-budget-ms")
    assert budget is not None and 0 < int(budget) <= 30_000


async def test_one_attempt_by_default_and_two_with_response_format(
    nursery: trio.Nursery,
) -> None:
    node = Node(failures=3)
    lb = await start_lb(nursery, [await start_scripted(nursery, node, ("m",))], max_retries=0,
                        breaker_threshold=0)
    sleeps = Sleeps()
    lb_client = client(lb.url, sleeps)
    with pytest.raises(openai.InternalServerError):
        await lb_client.chat(model="m", **CHAT)
    assert len(node.heads) == 1
    with pytest.raises(openai.InternalServerError):
        await lb_client.chat(model="m", response_format={"type": "json_object"}, **CHAT)
    assert len(node.heads) == 3


async def test_a_clients_mistake_is_not_retried(nursery: trio.Nursery) -> None:
    node = Node(failures=0)
    lb = await start_lb(nursery, [await start_scripted(nursery, node, ("m",))])
    sleeps = Sleeps()
    with pytest.raises(openai.NotFoundError):
        await client(lb.url, sleeps, attempts=3).chat(model="no-such-model", **CHAT)
    assert sleeps.waits == [] and node.heads == []


async def test_retry_after_is_honoured(nursery: trio.Nursery) -> None:
    node = Node(failures=5, status="429 Too Many Requests", extra="retry-after: 7")
    lb = await start_lb(nursery, [await start_scripted(nursery, node, ("m",))])
    sleeps = Sleeps()
    with pytest.raises(openai.RateLimitError):
        await client(lb.url, sleeps, attempts=2).chat(model="m", **CHAT)
    assert sleeps.waits == [7.0]


async def test_no_retry_when_the_budget_cannot_hold_it(nursery: trio.Nursery) -> None:
    node = Node(failures=5, status="429 Too Many Requests", extra="retry-after: 7")
    lb = await start_lb(nursery, [await start_scripted(nursery, node, ("m",))])
    sleeps = Sleeps()
    with pytest.raises(openai.RateLimitError):
        await client(lb.url, sleeps, attempts=3, budget=2).chat(model="m", **CHAT)
    assert sleeps.waits == []


async def test_the_breaker_opens_then_probes(nursery: trio.Nursery) -> None:
    now = [0.0]
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = listener.getsockname()[1]
    lb_client = AsyncLBClient(
        settings=ClientSettings(cb_threshold=2, cb_window=15), sleep=Sleeps(),
        clock=lambda: now[0], base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
    )
    for _ in range(2):
        with pytest.raises(openai.APIConnectionError):
            await lb_client.chat(model="m", **CHAT)
    with pytest.raises(CircuitOpen):
        await lb_client.chat(model="m", **CHAT)
    now[0] = 15.0  # half-open: one probe goes out, fails, and opens it again
    with pytest.raises(openai.APIConnectionError):
        await lb_client.chat(model="m", **CHAT)
    with pytest.raises(CircuitOpen):
        await lb_client.chat(model="m", **CHAT)
    listener.close()


async def test_the_sync_client(nursery: trio.Nursery) -> None:
    node = Node(failures=1)
    lb = await start_lb(nursery, [await start_scripted(nursery, node, ("m",))], max_retries=0,
                        breaker_threshold=0)
    waits: list[float] = []
    sync = LBClient(settings=ClientSettings(attempts=2), sleep=waits.append,
                    base_url=f"{lb.url}/v1", api_key="k")
    answer = await trio.to_thread.run_sync(lambda: sync.chat(model="m", **CHAT))
    assert answer.choices[0].message.content == "hi" and len(waits) == 1


def test_settings_from_the_environment() -> None:
    assert ClientSettings.from_env({}) == ClientSettings()
    settings = ClientSettings.from_env({
        "LM_RETRY_ATTEMPTS": "3", "LM_RETRY_BASE_DELAY": "0.5", "LM_REQUEST_BUDGET_MS": "2500",
        "LLM_CB_THRESHOLD": "5", "LLM_CB_WINDOW_SEC": "30",
    })
    assert settings == ClientSettings(attempts=3, base_delay=0.5, budget=2.5, cb_threshold=5,
                                      cb_window=30)
    for bad in ({"LM_RETRY_ATTEMPTS": "0"}, {"LM_RETRY_BASE_DELAY": "soon"}):
        with pytest.raises(ValueError):
            ClientSettings.from_env(bad)


@given(st.integers(1, 20), st.floats(0, 10), st.integers())
def test_backoff_stays_within_its_cap(attempt: int, base: float, seed: int) -> None:
    assert 0 <= backoff(attempt, base, random.Random(seed)) <= base * 2 ** (attempt - 1)


@given(st.lists(st.sampled_from(["ok", "fail", "wait"]), max_size=40), st.integers(1, 4))
def test_the_breaker_lets_nothing_through_while_open(events: list[str], threshold: int) -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold, 10.0, clock=lambda: now[0])
    in_a_row = 0
    for event in events:
        if event == "wait":
            now[0] += 6.0
            continue
        allowed = breaker.allow()
        if breaker.open_until is not None and now[0] < breaker.open_until:
            assert not allowed
        if in_a_row < threshold:
            assert allowed  # closed until `threshold` failures in a row
        if not allowed:
            continue
        if event == "ok":
            breaker.success()
            in_a_row = 0
        else:
            breaker.failure()
            in_a_row += 1
