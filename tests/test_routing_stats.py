"""Routing stats: the `RoutingStats` observer on hand-made traces (autojump clock), and
`GET /api/routing/stats` end to end (official SDK -> lb -> mock nodes, one of them failing)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
import trio.testing
from harness import CHAT, Running, start_lb, start_mock
from harness import sdk as sdk_for

from lb.obs.observer import Outcome, RequestObserver, Trace
from lb.obs.stats import RoutingStats, Window

MODEL = "llama-3.1-8b"
OTHER = "qwen3-0.6b"


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def trace(
    model: str | None = MODEL, *, node: str | None = "a:1", stream: bool = False,
    duration: float = 1.0, first_byte: float | None = None, error: str | None = None,
    client_gone: bool = False, tokens: tuple[int, int] | None = None,
) -> Trace:
    made = Trace("req", "chat", stream, model or "nope", 0.0)
    made.model, made.node, made.duration, made.first_byte = model, node, duration, first_byte
    made.error, made.client_gone = error, client_gone
    if tokens is not None:
        made.prompt_tokens, made.completion_tokens = tokens
    return made


def attempt(stats: RoutingStats, node: str, outcome: Outcome, seconds: float) -> None:
    stats.attempt_finished(trace(node=node), node, outcome, 200, seconds)


# --- the observer ---------------------------------------------------------------------------


async def test_it_is_a_request_observer(autojump_clock: trio.testing.MockClock) -> None:
    observer: RequestObserver = RoutingStats()
    one = trace()
    observer.started(one)
    observer.queued(one, 0.5)
    observer.first_byte(one, 0.1)
    observer.finished(one)
    assert isinstance(observer, RoutingStats) and observer.models[MODEL].requests == 1


async def test_node_counts_attempts_and_only_the_nodes_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats = RoutingStats()
    for outcome in (Outcome.SUCCESS, Outcome.SUCCESS, Outcome.SUCCESS, Outcome.FAILURE,
                    Outcome.BUSY):
        attempt(stats, "a:1", outcome, 0.2)
    attempt(stats, "b:2", Outcome.NO_VERDICT, 9.0)
    a, b = stats.node_view("a:1"), stats.node_view("b:2")
    assert (a["requests"], a["failures"], a["success_rate"]) == (5, 1, 0.8)
    # Only successful attempts time the node: a timeout is how long lb waited.
    assert a["latency_ms"] == {"avg": 200.0, "p50": 200.0, "p95": 200.0, "samples": 3}
    assert (b["requests"], b["failures"], b["success_rate"]) == (1, 0, 1.0)
    assert b["latency_ms"] == {"avg": None, "p50": None, "p95": None, "samples": 0}


async def test_percentiles_are_nearest_rank(autojump_clock: trio.testing.MockClock) -> None:
    stats = RoutingStats()
    for millis in reversed(range(1, 101)):  # arrival order does not matter
        attempt(stats, "a:1", Outcome.SUCCESS, millis / 1000)
    latency = stats.node_view("a:1")["latency_ms"]
    assert latency == {"avg": 50.5, "p50": 50.0, "p95": 95.0, "samples": 100}
    attempt(stats, "b:2", Outcome.SUCCESS, 0.007)
    assert stats.node_view("b:2")["latency_ms"] == {
        "avg": 7.0, "p50": 7.0, "p95": 7.0, "samples": 1,
    }
    # The smallest value with at least q of them at or below it: 5 -> the 3rd, 30 -> the 29th.
    for millis in range(1, 6):
        attempt(stats, "c:3", Outcome.SUCCESS, millis / 1000)
    for millis in range(1, 31):
        attempt(stats, "d:4", Outcome.SUCCESS, millis / 1000)
    assert stats.node_view("c:3")["latency_ms"]["p50"] == 3.0
    assert stats.node_view("d:4")["latency_ms"]["p95"] == 29.0


async def test_models_count_requests_failures_latency_ttft_and_tokens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats = RoutingStats()
    stats.finished(trace(duration=1.0, tokens=(10, 20)))
    stats.finished(trace(stream=True, duration=3.0, first_byte=0.25, tokens=(5, 7)))
    stats.finished(trace(error="all_upstreams_failed", duration=9.0))
    # A stream that broke after its first byte: a failure, with a TTFT.
    stats.finished(trace(stream=True, error="upstream_error", duration=8.0, first_byte=0.75))
    # The client left: counted, neither a failure nor a latency.
    stats.finished(trace(client_gone=True, error="upstream_error", duration=0.1))
    stats.finished(trace(None, node=None, error="model_not_found"))  # never routed
    stats.finished(trace(OTHER, node="b:2", duration=2.0))
    view = stats.model_view(MODEL)
    assert (view["requests"], view["failures"], view["success_rate"]) == (5, 2, 0.6)
    assert view["latency_ms"] == {"avg": 2000.0, "p50": 1000.0, "p95": 3000.0, "samples": 2}
    assert view["ttft_ms"] == {"avg": 500.0, "p50": 250.0, "p95": 750.0, "samples": 2}
    assert view["tokens"] == {"prompt": 15, "completion": 27}
    assert set(stats.models) == {MODEL, OTHER}
    other = stats.model_view(OTHER)
    assert other["ttft_ms"] == {"avg": None, "p50": None, "p95": None, "samples": 0}
    assert other["tokens"] == {"prompt": 0, "completion": 0}
    # The tokens also count for the node that answered.
    assert stats.node_view("a:1")["tokens"] == {"prompt": 15, "completion": 27}


async def test_unknown_keys_read_as_empty_without_being_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats = RoutingStats()
    empty = {"avg": None, "p50": None, "p95": None, "samples": 0}
    assert stats.model_view("nobody") == {
        "requests": 0, "failures": 0, "success_rate": None, "latency_ms": empty,
        "ttft_ms": empty, "tokens": {"prompt": 0, "completion": 0},
    }
    assert stats.node_view("x:1")["success_rate"] is None
    assert not stats.models and not stats.nodes


async def test_the_window_drops_old_observations_but_counts_stay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats = RoutingStats()
    attempt(stats, "a:1", Outcome.SUCCESS, 1.0)
    stats.finished(trace(stream=True, duration=1.0, first_byte=1.0))
    await trio.sleep(200)
    attempt(stats, "a:1", Outcome.SUCCESS, 2.0)
    stats.finished(trace(stream=True, duration=2.0, first_byte=2.0))
    await trio.sleep(100)  # the first ones are now exactly 300 s old: still in
    assert stats.node_view("a:1")["latency_ms"]["samples"] == 2
    await trio.sleep(1)
    node, model = stats.node_view("a:1"), stats.model_view(MODEL)
    assert node["latency_ms"] == {"avg": 2000.0, "p50": 2000.0, "p95": 2000.0, "samples": 1}
    assert model["latency_ms"] == node["latency_ms"] == model["ttft_ms"]
    assert node["requests"] == 2 and model["requests"] == 2
    await trio.sleep(300)
    empty = {"avg": None, "p50": None, "p95": None, "samples": 0}
    assert stats.node_view("a:1")["latency_ms"] == empty
    assert stats.model_view(MODEL)["ttft_ms"] == empty
    assert stats.node_view("a:1")["requests"] == 2
    assert len(stats.nodes["a:1"].latency) == 0  # dropped, not just hidden


async def test_memory_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    stats = RoutingStats(size=8, max_keys=4)
    for i in range(1, 101):
        attempt(stats, "a:1", Outcome.SUCCESS, i / 1000)
    assert len(stats.nodes["a:1"].latency) == 8
    # The last 8 (93..100 ms) are what the percentiles come from; the counts are all there.
    view = stats.node_view("a:1")
    assert view["latency_ms"] == {"avg": 96.5, "p50": 96.0, "p95": 100.0, "samples": 8}
    assert view["requests"] == 100
    for i in range(10):
        attempt(stats, f"n{i}:1", Outcome.SUCCESS, 0.1)
        stats.finished(trace(f"model-{i}", node=f"n{i}:1"))
    assert list(stats.nodes) == ["n6:1", "n7:1", "n8:1", "n9:1"]
    assert list(stats.models) == ["model-6", "model-7", "model-8", "model-9"]


async def test_a_window_with_an_injected_clock() -> None:
    now = [0.0]
    stats = RoutingStats(clock=lambda: now[0], window=10.0)
    attempt(stats, "a:1", Outcome.SUCCESS, 0.5)
    now[0] = 10.5
    assert stats.node_view("a:1")["latency_ms"]["samples"] == 0
    window = Window(10.0, 2)
    window.add(0.0, 1.0)
    window.add(5.0, 2.0)
    window.add(6.0, 3.0)
    assert window.values(6.0) == [2.0, 3.0]
    assert window.values(15.5) == [3.0]


# --- GET /api/routing/stats -----------------------------------------------------------------


async def routing_stats(lb: Running, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"{lb.url}/api/routing/stats", headers=headers or {})


async def test_routing_stats_end_to_end(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        good = await start_mock(nursery, models=(MODEL, OTHER), tokens=6)
        bad = await start_mock(nursery, models=(MODEL,), tokens=6)
        lb = await start_lb(nursery, [good, bad], routing_strategy="round-robin",
                            breaker_threshold=2, scan_interval=60)
        async with httpx.AsyncClient() as http:  # lb has seen both healthy: now `bad` breaks
            (await http.post(f"{bad.url}/mock/fault", json={"fault": "status=503"})
             ).raise_for_status()
        client = sdk_for(lb)
        # Round robin from the first node: requests 2 and 4 try `bad` first and fail over.
        for stream in (False, True, False, True):
            if stream:
                chunks = await client.chat.completions.create(model=MODEL, stream=True, **CHAT)
                assert [chunk async for chunk in chunks]
            else:
                answer = await client.chat.completions.create(model=MODEL, **CHAT)
                assert answer.choices[0].message.content
        got = await routing_stats(lb)
        assert got.status_code == 200
        body: dict[str, Any] = got.json()

    assert body["strategy"] == "ROUND_ROBIN" and body["window_secs"] == 300
    assert list(body["nodes"]) == [good.key, bad.key]
    ok, failing = body["nodes"][good.key], body["nodes"][bad.key]
    assert (ok["requests"], ok["failures"], ok["success_rate"]) == (4, 0, 1.0)
    assert (failing["requests"], failing["failures"], failing["success_rate"]) == (2, 2, 0.0)
    assert ok["breaker"] == "closed" and failing["breaker"] == "open"  # 2 failures open it
    assert ok["healthy"] is True and failing["healthy"] is True  # no probe since
    assert ok["inflight"] == 0 and ok["capacity"] == 0 and ok["weight"] == 1.0
    assert ok["latency_ms"]["samples"] == 4
    assert 0 < ok["latency_ms"]["p50"] <= ok["latency_ms"]["p95"]
    assert failing["latency_ms"] == {"avg": None, "p50": None, "p95": None, "samples": 0}
    assert ok["tokens"]["prompt"] > 0 and ok["tokens"]["completion"] > 0
    assert failing["tokens"] == {"prompt": 0, "completion": 0}

    assert list(body["models"]) == [MODEL, OTHER]
    model = body["models"][MODEL]
    assert (model["requests"], model["failures"], model["success_rate"]) == (4, 0, 1.0)
    assert model["latency_ms"]["samples"] == 4 and model["latency_ms"]["p95"] > 0
    assert model["ttft_ms"]["samples"] == 2 and model["ttft_ms"]["p50"] > 0
    # The whole request takes at least as long as its first byte, and its attempts.
    assert model["latency_ms"]["p95"] >= model["ttft_ms"]["p95"]
    assert model["tokens"] == ok["tokens"]
    unused = body["models"][OTHER]
    assert unused["requests"] == 0 and unused["success_rate"] is None
    assert unused["latency_ms"]["p50"] is None and unused["ttft_ms"]["p95"] is None


async def test_a_request_every_node_fails_is_a_model_failure(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], max_retries=0)
        async with httpx.AsyncClient() as client:
            (await client.post(f"{node.url}/mock/fault", json={"fault": "status=500"})
             ).raise_for_status()
            answer = await client.post(f"{lb.url}/v1/chat/completions",
                                       json={"model": MODEL, **CHAT})
            assert answer.status_code == 502
        body = (await routing_stats(lb)).json()
    model = body["models"][MODEL]
    assert (model["requests"], model["failures"], model["success_rate"]) == (1, 1, 0.0)
    assert model["latency_ms"]["samples"] == 0
    assert body["nodes"][node.key]["failures"] == 1


async def test_routing_stats_need_the_admin_key_once_set(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], admin_key="s3cret")
        assert (await routing_stats(lb)).status_code == 401
        wrong = await routing_stats(lb, {"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = await routing_stats(lb, {"authorization": "Bearer s3cret"})
        assert right.status_code == 200
        assert list(right.json()["nodes"]) == [node.key]
