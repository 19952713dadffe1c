"""Hedged requests (HEDGE_AFTER_MS): the delay rule (pure, hypothesis), the race in dispatch on
trio's autojump clock against scripted nodes, and end to end with the `openai` SDK over real
sockets in front of mock nodes."""

from __future__ import annotations

import math
from typing import Any

import httpx
import openai
import pytest
import trio
import trio.testing
from harness import CHAT, Running, RunningMock, sdk, start_lb, start_mock
from hypothesis import given
from hypothesis import strategies as st
from test_dispatch import (
    DONE,
    EVENT,
    OK_BODY,
    SSE,
    RecordingSink,
    Script,
    dispatcher,
    failures,
    intent,
    node,
    requests,
    sse,
)

from lb.config import ConfigError, load_settings
from lb.errors import AllUpstreamsFailed, DeadlineExceeded, UpstreamStreamError
from lb.obs.observer import Trace
from lb.routing import hedge
from lb.routing.dispatch import Dispatcher
from lb.routing.intent import RouteRequest
from lb.upstream.client import UpstreamClosed

# --- the delay rule --------------------------------------------------------------------------

finite_ms = st.floats(min_value=0.001, max_value=1e7, allow_nan=False, allow_infinity=False)
seconds = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)


@given(finite_ms)
def test_a_fixed_delay_is_that_many_milliseconds(ms: float) -> None:
    assert hedge.parse_hedge_after(repr(ms)) == ms
    assert hedge.delay_for(ms, []) == pytest.approx(ms / 1000)


@pytest.mark.parametrize("off", ["", "0", " 0.0 ", "off", "OFF", 0])
def test_zero_or_empty_is_off(off: Any) -> None:
    assert hedge.parse_hedge_after(off) is None
    assert hedge.delay_for(None, [1.0] * 100) is None


@pytest.mark.parametrize("bad", ["soon", "-5", "nan", "inf", True])
def test_a_bad_value_is_a_clear_config_error(bad: Any) -> None:
    with pytest.raises(ValueError):
        hedge.parse_hedge_after(bad)
    if isinstance(bad, str):
        with pytest.raises(ConfigError, match="HEDGE_AFTER_MS"):
            load_settings(env={"HEDGE_AFTER_MS": bad})


def test_the_settings_read_hedge_after_ms_and_hedge_max() -> None:
    settings = load_settings(env={"HEDGE_AFTER_MS": "Adaptive", "HEDGE_MAX": "2"})
    assert (settings.hedge_after_ms, settings.hedge_max) == ("adaptive", 2)
    assert load_settings(env={"HEDGE_AFTER_MS": "250"}).hedge_after_ms == 250.0
    assert load_settings(env={}).hedge_after_ms is None  # off by default
    with pytest.raises(ConfigError, match="HEDGE_MAX"):
        load_settings(env={"HEDGE_MAX": "0"})


@given(st.lists(seconds, max_size=hedge.MIN_SAMPLES - 1))
def test_adaptive_does_not_hedge_before_it_knows_what_slow_is(recent: list[float]) -> None:
    assert hedge.delay_for(hedge.ADAPTIVE, recent) is None


@given(st.lists(seconds, min_size=hedge.MIN_SAMPLES, max_size=500))
def test_adaptive_is_the_p95_never_under_the_floor(recent: list[float]) -> None:
    delay = hedge.delay_for(hedge.ADAPTIVE, recent)
    assert delay is not None and delay >= hedge.MIN_DELAY
    assert delay == hedge.MIN_DELAY or delay in recent
    # At least 95% of the recent answers came by then, and fewer than 95% came before it.
    assert sum(value <= delay for value in recent) >= math.ceil(0.95 * len(recent))
    if delay > hedge.MIN_DELAY:
        assert sum(value < delay for value in recent) < math.ceil(0.95 * len(recent))


@given(st.lists(seconds, min_size=hedge.MIN_SAMPLES, max_size=200), seconds)
def test_a_slower_answer_never_shortens_the_adaptive_delay(
    recent: list[float], extra: float
) -> None:
    before = hedge.delay_for(hedge.ADAPTIVE, recent)
    slower = [*recent[1:], max(recent[0], 0.0) + extra]  # one figure replaced by a larger one
    after = hedge.delay_for(hedge.ADAPTIVE, slower)
    assert before is not None and after is not None and after >= before


def test_the_hedger_keeps_a_window_per_model_and_reuses_its_p95_for_a_second() -> None:
    hedger = hedge.Hedger(hedge.ADAPTIVE)
    for i in range(hedge.MIN_SAMPLES):
        hedger.observe("m1", float(i) / 100, 0.1)
    assert hedger.delay("m1", 1.0) == pytest.approx(0.1)
    assert hedger.delay("m2", 1.0) is None  # another model knows nothing yet
    for i in range(200):
        hedger.observe("m1", 1.0 + i / 1000, 2.0)
    assert hedger.delay("m1", 1.5) == pytest.approx(0.1)  # cached
    assert hedger.delay("m1", 2.0) == pytest.approx(2.0)
    # Figures older than the window are forgotten.
    assert hedger.delay("m1", 2.0 + hedge.WINDOW_SECS + 10) is None
    fixed = hedge.Hedger(250.0)
    fixed.observe("m1", 0.0, 9.0)  # nothing kept for a fixed delay
    assert fixed.delay("m1", 0.0) == 0.25 and not fixed._windows


# --- the race in dispatch (autojump clock, scripted nodes) -----------------------------------


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def hedging(*nodes: Any, after: Any = 500.0, **options: Any) -> Dispatcher:
    """FAILOVER: the first node given is always tried first."""
    return dispatcher(*nodes, routing_strategy="FAILOVER", hedge_after_ms=after, **options)


async def go(d: Dispatcher, request: RouteRequest | None = None) -> tuple[RecordingSink, Trace]:
    sink, trace = RecordingSink(), trace_for()
    await d.execute(request or intent(), sink, trace)
    return sink, trace


def trace_for() -> Trace:
    return Trace("req-1", "chat", False, "m1", trio.current_time())


def idle(*nodes: Any) -> bool:
    """Every slot released and every breaker closed with no failure."""
    return all(
        each.limiter.borrowed_tokens == 0 and each.breaker.consecutive_failures == 0
        for each in nodes
    )


async def test_a_slow_first_attempt_is_hedged_and_the_fast_node_answers(
    autojump_clock: Any,
) -> None:
    a, slow = node(Script(head_after=30.0, body=[b'{"slow": 1}']))
    b, fast = node(Script(head_after=1.0), port=2)
    start = trio.current_time()
    sink, trace = await go(hedging(a, b))
    assert (sink.status, sink.body) == (200, OK_BODY)
    assert sink.tags[b"x-attempts"] == b"2" and sink.tags[b"x-routed-node"] == b.key.encode()
    assert trio.current_time() - start == pytest.approx(1.5)
    assert (trace.attempts, trace.hedges, trace.failovers, trace.node) == (2, 1, 0, b.key)
    assert len(slow.requests) == len(fast.requests) == 1
    # The slow attempt was cancelled: no verdict on its node, its slot free again.
    assert requests(a) == 1 and failures(a) == 0 and idle(a, b)


async def test_without_hedging_the_slow_node_answers(autojump_clock: Any) -> None:
    a, _ = node(Script(head_after=30.0, body=[b'{"slow": 1}']))
    b, fast = node(Script(head_after=1.0), port=2)
    start = trio.current_time()
    sink, trace = await go(dispatcher(a, b, routing_strategy="FAILOVER"))
    assert sink.body == b'{"slow": 1}' and sink.tags[b"x-attempts"] == b"1"
    assert trio.current_time() - start == pytest.approx(30.0)
    assert trace.hedges == 0 and not fast.requests


async def test_an_attempt_that_answers_before_the_delay_is_not_hedged(
    autojump_clock: Any,
) -> None:
    a, _ = node(Script(head_after=0.4))
    b, other = node(port=2)
    sink, trace = await go(hedging(a, b))
    assert sink.tags[b"x-attempts"] == b"1" and trace.hedges == 0 and not other.requests


async def test_the_first_attempt_answering_first_wins_over_its_hedge(autojump_clock: Any) -> None:
    a, _ = node(Script(head_after=2.0, body=[b'{"first": 1}']))
    b, late = node(Script(head_after=10.0), port=2)
    sink, trace = await go(hedging(a, b))
    assert sink.body == b'{"first": 1}' and sink.tags[b"x-routed-node"] == a.key.encode()
    assert sink.tags[b"x-attempts"] == b"2" and trace.node == a.key
    assert len(late.requests) == 1 and failures(b) == 0 and idle(a, b)


async def test_a_failure_before_the_delay_fails_over_as_without_hedging(
    autojump_clock: Any,
) -> None:
    a, _ = node(Script(status=500, head_after=0.1, body=[b'{"error": {"message": "boom"}}']))
    b, _ = node(port=2)
    sink, trace = await go(hedging(a, b))
    assert sink.body == OK_BODY and sink.tags[b"x-attempts"] == b"2"
    assert (trace.hedges, trace.failovers) == (0, 1) and failures(a) == 1


async def test_a_stream_is_hedged_and_only_the_winners_events_reach_the_client(
    autojump_clock: Any,
) -> None:
    slow_event = b'data: {"slow": 1}\n\n'
    a, _ = node(Script(headers=list(SSE), head_after=5.0, body=[slow_event, DONE]))
    b, _ = node(sse(EVENT, 1.0, EVENT, DONE), port=2)
    sink, trace = await go(hedging(a, b, attempt_timeout=60.0), intent(stream=True))
    assert sink.body == EVENT + EVENT + DONE
    assert sink.tags[b"x-routed-node"] == b.key.encode() and trace.hedges == 1
    assert failures(a) == 0 and idle(a, b)


async def test_the_loser_is_cancelled_the_moment_the_winners_head_arrives(
    autojump_clock: Any,
) -> None:
    """The first attempt would have failed later (a 500 after 2 s): it is cut when the hedge's
    head arrives, so its node is charged nothing, and the client gets the hedge's stream."""
    a, _ = node(Script(status=500, head_after=2.0, body=[b"{}"]))
    b, _ = node(sse(EVENT, 5.0, EVENT, DONE), port=2)
    sink, _ = await go(hedging(a, b), intent(stream=True))
    assert sink.body == EVENT + EVENT + DONE and sink.tags[b"x-routed-node"] == b.key.encode()
    assert failures(a) == failures(b) == 0 and idle(a, b)


async def test_the_first_attempt_failing_during_the_race_leaves_the_hedge_running(
    autojump_clock: Any,
) -> None:
    a, _ = node(Script(status=500, head_after=0.6, body=[b"{}"]))
    b, _ = node(Script(head_after=1.0), port=2)
    c, third = node(port=3)
    start = trio.current_time()
    sink, trace = await go(hedging(a, b, c))
    assert sink.body == OK_BODY and sink.tags[b"x-routed-node"] == b.key.encode()
    assert trio.current_time() - start == pytest.approx(1.5)
    assert (trace.attempts, trace.hedges, trace.failovers) == (2, 1, 0)
    assert failures(a) == 1 and not third.requests


async def test_both_failing_fails_over_to_a_third_node(autojump_clock: Any) -> None:
    a, _ = node(Script(status=500, head_after=2.0, body=[b"{}"]))
    b, _ = node(Script(status=503, head_after=1.0, body=[b"{}"]), port=2)
    c, _ = node(port=3)
    sink, trace = await go(hedging(a, b, c))
    assert sink.body == OK_BODY and sink.tags[b"x-attempts"] == b"3"
    assert sink.tags[b"x-routed-node"] == c.key.encode()
    assert failures(a) == failures(b) == 1 and trace.hedges == 1


async def test_a_hedge_counts_against_the_attempts_a_request_has(autojump_clock: Any) -> None:
    a, _ = node(Script(status=500, head_after=2.0, body=[b"{}"]))
    b, _ = node(Script(status=503, head_after=1.0, body=[b"{}"]), port=2)
    c, third = node(port=3)
    with pytest.raises(AllUpstreamsFailed):
        await go(hedging(a, b, c, max_retries=1))
    assert not third.requests


async def test_a_hedge_never_queues_for_a_slot(autojump_clock: Any) -> None:
    a, _ = node(Script(head_after=30.0))
    b, busy = node(Script(head_after=100.0), port=2, capacity=1)
    d = hedging(a, b, queue_timeout=600.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(go, d, intent(node=b.key))  # holds b's only slot
        await trio.sleep(0.1)
        start = trio.current_time()
        sink, trace = await go(d)
        assert trio.current_time() - start == pytest.approx(30.0)
    assert sink.tags[b"x-attempts"] == b"1" and trace.hedges == 0 and len(busy.requests) == 1


async def test_the_winners_stream_breaking_is_the_usual_error_event_case(
    autojump_clock: Any,
) -> None:
    """Once the winner's first byte went out there is no retry: its stream breaking raises
    UpstreamStreamError as without hedging (not an ExceptionGroup from the race)."""
    a, _ = node(Script(headers=list(SSE), head_after=30.0, body=[EVENT, DONE]))
    b, _ = node(sse(EVENT, UpstreamClosed("reset")), port=2)
    sink = RecordingSink()
    with pytest.raises(UpstreamStreamError):
        await hedging(a, b).execute(intent(stream=True), sink, trace_for())
    assert sink.body == EVENT and sink.tags[b"x-routed-node"] == b.key.encode()
    assert failures(b) == 1 and failures(a) == 0 and idle(a)


async def test_a_twin_is_never_a_fallback_model(autojump_clock: Any) -> None:
    """MODEL_FALLBACKS nodes come after the model's own in the candidates, but they serve
    another model: a twin is the same request, so it only goes to a node of the same model."""
    a, _ = node(Script(head_after=30.0))
    c, other = node(port=3)
    d = hedging(a, c, fallbacks={"m1": ("m2",)})
    d.registry.update(c, models=["m2"], healthy=True)
    sink, trace = await go(d)
    assert trace.hedges == 0 and not other.requests and sink.tags[b"x-attempts"] == b"1"


async def test_the_deadline_covers_both_attempts(autojump_clock: Any) -> None:
    a, _ = node(Script(head_after=300.0))
    b, _ = node(Script(head_after=300.0), port=2)
    with pytest.raises(DeadlineExceeded) as caught:
        await go(hedging(a, b), intent(budget=5.0))
    assert "after 2 attempt(s)" in caught.value.message
    assert trio.current_time() == pytest.approx(5.0)
    assert failures(a) == failures(b) == 0 and idle(a, b)


async def test_a_client_leaving_cancels_both_attempts(autojump_clock: Any) -> None:
    a, _ = node(Script(head_after=300.0))
    b, _ = node(Script(head_after=300.0), port=2)
    with trio.move_on_after(3.0):
        await go(hedging(a, b))
    assert failures(a) == failures(b) == 0 and idle(a, b)


async def test_a_request_for_one_node_is_never_hedged(autojump_clock: Any) -> None:
    a, _ = node(Script(head_after=30.0))
    b, other = node(port=2)
    sink, trace = await go(hedging(a, b), intent(node=a.key))
    assert sink.tags[b"x-attempts"] == b"1" and trace.hedges == 0 and not other.requests


async def test_hedge_max_starts_one_more_hedge_per_delay(autojump_clock: Any) -> None:
    a, _ = node(Script(head_after=30.0))
    b, _ = node(Script(head_after=30.0), port=2)
    c, _ = node(Script(head_after=0.1, body=[b'{"c": 1}']), port=3)
    start = trio.current_time()
    sink, trace = await go(hedging(a, b, c, hedge_max=2))
    assert sink.body == b'{"c": 1}' and trace.hedges == 2 and sink.tags[b"x-attempts"] == b"3"
    assert trio.current_time() - start == pytest.approx(1.1)
    assert idle(a, b, c)


async def test_a_non_json_answer_from_the_winner_fails_over(autojump_clock: Any) -> None:
    """The race is won on the answer's head; a winner whose body is broken is a failure like
    any other, and the request goes on to the next node."""
    a, _ = node(Script(head_after=30.0))
    b, _ = node(Script(head_after=1.0, body=[b"<html>login</html>"]), port=2)
    c, _ = node(Script(body=[b'{"c": 1}']), port=3)
    sink, trace = await go(hedging(a, b, c))
    assert trace.hedges == 1 and trace.failovers == 1
    assert sink.body == b'{"c": 1}' and failures(b) == 1 and failures(a) == 0
    assert sink.tags[b"x-attempts"] == b"3"


async def test_adaptive_hedges_after_the_models_recent_p95(autojump_clock: Any) -> None:
    a, slow = node(Script(head_after=0.2))
    b, _ = node(Script(head_after=0.2), port=2)
    d = hedging(a, b, after="adaptive")
    for _ in range(hedge.MIN_SAMPLES - 1):
        _, trace = await go(d)
        assert trace.hedges == 0  # too few figures yet
    _, trace = await go(d)
    assert trace.hedges == 0  # the 20th: it answered in 0.2 s, no later than the p95
    await trio.sleep(hedge.REFRESH_SECS)
    slow.scripts[0] = Script(head_after=30.0)
    start = trio.current_time()
    sink, trace = await go(d)
    assert trace.hedges == 1 and sink.tags[b"x-routed-node"] == b.key.encode()
    assert trio.current_time() - start == pytest.approx(0.4)


# --- end to end: the openai SDK, lb and mock nodes on real sockets ---------------------------

MODEL = "llama-3.1-8b"


async def two_nodes(
    nursery: trio.Nursery, slow_ms: float, **options: Any
) -> tuple[RunningMock, RunningMock, Running]:
    """A slow and a fast mock; FAILOVER: the slow one is always tried first."""
    slow = await start_mock(nursery, models=(MODEL,), name="slow", ttft_ms=slow_ms)
    fast = await start_mock(nursery, models=(MODEL,), name="fast")
    lb = await start_lb(nursery, [slow, fast], routing_strategy="FAILOVER", **options)
    return slow, fast, lb


async def node_views(lb: Running) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        nodes = (await client.get(f"{lb.url}/v1/nodes")).json()["nodes"]
    return {view["node"]: view for view in nodes}


async def settled(slow: RunningMock) -> dict[str, Any]:
    """The slow mock's stats once it has seen its client leave."""
    while (stats := await slow.stats())["concurrent"]:
        await trio.sleep(0.01)
    return stats


@pytest.mark.parametrize("stream", [False, True])
async def test_the_sdk_gets_the_fast_nodes_answer_and_the_slow_one_is_cut(
    nursery: trio.Nursery, stream: bool
) -> None:
    with trio.fail_after(10):
        # The slow node would take 60 s: only the hedge can answer within fail_after.
        slow, fast, lb = await two_nodes(nursery, 60_000, hedge_after_ms=100.0)
        client = sdk(lb)
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, stream=stream, **CHAT
        )
        assert raw.headers["x-attempts"] == "2"
        assert raw.headers["x-routed-node"] == fast.key
        assert raw.headers["x-mock-node"] == "fast"
        answer = raw.parse()
        if stream:
            assert isinstance(answer, openai.AsyncStream)
            text = "".join([
                chunk.choices[0].delta.content or "" async for chunk in answer if chunk.choices
            ])
        else:
            assert not isinstance(answer, openai.AsyncStream)
            text = answer.choices[0].message.content or ""
        assert text  # one whole answer
        # The slow node saw lb leave; its slot is free and it is charged nothing.
        stats = await settled(slow)
        assert stats["disconnects"] == 1 and await slow.chats() == await fast.chats() == 1
        views = await node_views(lb)
        assert views[slow.key]["inflight"] == views[fast.key]["inflight"] == 0
        assert views[slow.key]["failures"] == 0 and views[slow.key]["breaker"] == "closed"


async def test_without_hedging_the_sdk_waits_for_the_slow_node(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        slow, fast, lb = await two_nodes(nursery, 1000)
        raw = await sdk(lb).chat.completions.with_raw_response.create(model=MODEL, **CHAT)
        assert raw.headers["x-attempts"] == "1" and raw.headers["x-mock-node"] == "slow"
        assert (await slow.stats())["disconnects"] == 0 and await fast.chats() == 0
