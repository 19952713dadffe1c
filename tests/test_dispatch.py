"""Dispatch on trio's autojump clock: failover, verdicts, the breaker, queueing, deadlines and
idle streams, against scripted nodes (the `Upstream` seam) and a recording sink. No sockets and
no wall clock: every timeout here is minutes long and takes no real time."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.testing

from lb.cluster.node import Node
from lb.cluster.registry import Registry
from lb.config import NodeConfig, Settings
from lb.errors import (
    AllUpstreamsFailed,
    CapacityExceeded,
    DeadlineExceeded,
    LBError,
    LocalResourcesExhausted,
    NoHealthyNode,
    RateLimited,
    ShuttingDown,
    UpstreamStreamError,
)
from lb.http.types import ClientGone, Headers
from lb.obs.nodes import NodeCounters
from lb.obs.observer import Observers, Trace
from lb.routing.dispatch import Dispatcher
from lb.routing.intent import RouteRequest
from lb.routing.strategies import Strategy
from lb.upstream.client import ConnectError, LocalResourceError, UpstreamClosed

MODEL = "m1"
JSON: Headers = [(b"content-type", b"application/json"), (b"content-length", b"10")]
SSE: Headers = [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")]
SSE_CLOSE_DELIMITED: Headers = [(b"content-type", b"text/event-stream")]
OK_BODY = b'{"ok": 1}'
EVENT = b'data: {"choices": []}\n\n'
DONE = b"data: [DONE]\n\n"

Step = bytes | float | Exception  # send bytes, sleep seconds, or raise


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@attrs.define
class Script:
    """What a node does with one request."""

    status: int = 200
    headers: Headers = attrs.field(factory=lambda: list(JSON))
    body: list[Step] = attrs.field(factory=lambda: [OK_BODY])
    head_after: float = 0.0  # seconds before the response head
    fail: Exception | None = None  # raised instead of sending the request


class ScriptedResponse:
    def __init__(self, script: Script) -> None:
        self.status = script.status
        self.headers = script.headers
        self._steps = deque(script.body)
        self.done = False

    async def receive_some(self) -> bytes:
        while self._steps:
            step = self._steps.popleft()
            if isinstance(step, float):
                await trio.sleep(step)
            elif isinstance(step, Exception):
                raise step
            else:
                return step
        self.done = True
        return b""

    async def read(self, limit: int | None = None) -> bytes:
        parts = []
        while data := await self.receive_some():
            parts.append(data)
        return b"".join(parts)


@attrs.define
class ScriptedNode:
    """An `Upstream` that plays scripts in order (the last one repeats)."""

    scripts: deque[Script]
    requests: list[dict[str, Any]] = attrs.field(factory=list)
    aborted: int = 0  # requests whose connection was closed before the body ended

    def request(
        self, method: str, path: str, headers: Headers, body: bytes = b"", *,
        on_sent: Callable[[], None] | None = None,
    ) -> AbstractAsyncContextManager[ScriptedResponse]:
        return self._request(method, path, headers, body, on_sent)

    @asynccontextmanager
    async def _request(
        self, method: str, path: str, headers: Headers, body: bytes,
        on_sent: Callable[[], None] | None,
    ) -> AsyncIterator[ScriptedResponse]:
        script = self.scripts.popleft() if len(self.scripts) > 1 else self.scripts[0]
        self.requests.append({"path": path, "headers": headers, "body": body})
        await trio.lowlevel.checkpoint()
        if script.fail is not None:
            raise script.fail
        if on_sent is not None:
            on_sent()
        await trio.sleep(script.head_after)
        response = ScriptedResponse(script)
        try:
            yield response
        finally:
            if not response.done:
                self.aborted += 1

    async def aclose(self) -> None:
        pass


@attrs.define
class RecordingSink:
    """A ResponseSink that keeps what was sent; `stall` makes writes block (a client that
    stopped reading)."""

    status: int = 0
    headers: Headers = attrs.field(factory=list)
    tags: dict[bytes, bytes] = attrs.field(factory=dict)
    body: bytes = b""
    committed: bool = False
    stall_after: int | None = None  # writes that succeed before every write blocks
    writes: int = 0
    drain_scope: trio.CancelScope | None = None

    def head(self, status: int, headers: Headers) -> None:
        assert not self.committed
        self.status, self.headers = status, headers

    def tag(self, name: bytes, value: bytes) -> None:
        self.tags[name] = value

    def cancel_on_drain(self, scope: trio.CancelScope) -> None:
        self.drain_scope = scope

    async def send(self, data: bytes) -> None:
        if self.stall_after is not None and self.writes >= self.stall_after:
            await trio.sleep_forever()
        self.writes += 1
        self.committed = True
        self.body += data


def node(*scripts: Script, port: int = 1, capacity: int = 0) -> tuple[Node, ScriptedNode]:
    upstream = ScriptedNode(deque(scripts or [Script()]))
    created = Node.create(
        NodeConfig(f"http://10.0.0.{port}:8000"), capacity=capacity, breaker_threshold=3,
        breaker_ttl=30.0, upstream=upstream,
    )
    return created, upstream


# The counts of the latest dispatcher's nodes (each test builds its own dispatcher).
COUNTERS: dict[str, NodeCounters] = {}


def dispatcher(*nodes: Node, **options: Any) -> Dispatcher:
    settings = Settings(**{"routing_strategy": "ROUND_ROBIN", **options})
    registry = Registry(nodes)
    counters = NodeCounters()
    for each in nodes:
        registry.update(each, models=[MODEL], healthy=True)
        COUNTERS[each.key] = counters
    return Dispatcher(registry, settings, observer=Observers([counters]))


def failures(node: Node) -> int:
    """Attempts on `node` that failed by its own fault (what /v1/nodes shows)."""
    return COUNTERS[node.key].failures[node.key]


def requests(node: Node) -> int:
    return COUNTERS[node.key].requests[node.key]


def trace() -> Trace:
    return Trace("req-1", "chat", False, MODEL, trio.current_time())


def intent(stream: bool = False, **fields: Any) -> RouteRequest:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return RouteRequest(
        **{
            "model": MODEL, "kind": "chat", "stream": stream, "body": body,
            "raw": orjson.dumps(body), "request_id": "req-1", "arrival": trio.current_time(),
            **fields,
        }
    )


async def run(d: Dispatcher, request: RouteRequest | None = None) -> RecordingSink:
    sink = RecordingSink()
    await d.execute(request or intent(), sink, trace())
    return sink


def sse(*events: bytes, tail: Step | None = None) -> Script:
    steps: list[Step] = list(events)
    if tail is not None:
        steps.append(tail)
    return Script(headers=list(SSE), body=steps)


# --- answers and failover --------------------------------------------------------------------


async def test_a_whole_answer_goes_through_with_lbs_headers(autojump_clock: Any) -> None:
    a, upstream = node()
    sink = await run(dispatcher(a))
    assert (sink.status, sink.body) == (200, OK_BODY)
    assert (b"content-length", str(len(OK_BODY)).encode()) in sink.headers
    assert sink.tags == {
        b"x-selected-model": MODEL.encode(), b"x-attempts": b"1", b"x-routed-node": a.key.encode()
    }
    assert upstream.requests[0]["path"] == "/v1/chat/completions"
    assert a.breaker.consecutive_failures == 0 and requests(a) == 1


async def test_a_5xx_fails_over_to_another_node(autojump_clock: Any) -> None:
    a, _ = node(Script(status=500, body=[b'{"error": {"message": "unknown role \'foo\'"}}']))
    b, _ = node(port=2)
    sink = await run(dispatcher(a, b))
    assert (sink.status, sink.body) == (200, OK_BODY)
    assert sink.tags[b"x-attempts"] == b"2" and sink.tags[b"x-routed-node"] == b.key.encode()
    assert failures(a) == 1 and failures(b) == 0
    assert a.last_error == "HTTP 500: unknown role 'foo'"


async def test_one_bad_request_is_not_an_outage(autojump_clock: Any) -> None:
    """With one node, a 500 is not retried on it (the same request would fail the same way), it
    is charged once, and its breaker stays closed for everyone else."""
    a, upstream = node(Script(status=500, body=[b'{"error": {"message": "bad input"}}']))
    d = dispatcher(a)
    with pytest.raises(AllUpstreamsFailed) as caught:
        await run(d)
    assert len(upstream.requests) == 1
    assert caught.value.message == f"All 1 attempt(s) failed: {a.key}: HTTP 500: bad input"
    assert failures(a) == 1 and a.breaker.consecutive_failures == 1
    assert a.breaker.allows(trio.current_time())


async def test_a_connect_error_may_be_retried_on_the_same_node_but_counts_once(
    autojump_clock: Any,
) -> None:
    a, upstream = node(Script(fail=ConnectError("refused")), Script())
    sink = await run(dispatcher(a))
    assert sink.status == 200 and len(upstream.requests) == 2
    # Failed once, then succeeded: the success closes the count again.
    assert failures(a) == 1 and a.breaker.consecutive_failures == 0


async def test_every_node_saying_429_is_a_429_with_the_smallest_retry_after(
    autojump_clock: Any,
) -> None:
    busy = [(b"content-type", b"application/json"), (b"retry-after", b"7")]
    busier = [(b"content-type", b"application/json"), (b"retry-after", b"30")]
    a, _ = node(Script(status=429, headers=busy, body=[b"{}"]))
    b, _ = node(Script(status=429, headers=busier, body=[b"{}"]), port=2)
    with pytest.raises(RateLimited) as caught:
        await run(dispatcher(a, b))
    assert caught.value.status == 429 and caught.value.retry_after == 7
    assert failures(a) == failures(b) == 0  # busy is not broken


@pytest.mark.parametrize(
    "script, reason",
    [
        (Script(status=302, headers=[(b"location", b"/elsewhere")], body=[b""]), "HTTP 302"),
        (Script(body=[b"<html>proxy login</html>"]), "HTTP 200 with a body that is not JSON"),
        (Script(fail=UpstreamClosed("reset by peer 10.0.0.1 h11 state")),
         "closed the connection before answering"),
    ],
)
async def test_broken_answers_are_the_nodes_failures(
    autojump_clock: Any, script: Script, reason: str
) -> None:
    a, _ = node(script)
    b, _ = node(port=2)
    sink = await run(dispatcher(a, b))
    assert sink.body == OK_BODY
    assert failures(a) == 1 and a.last_error == reason


async def test_a_4xx_goes_back_to_the_client_and_is_no_failure(autojump_clock: Any) -> None:
    answer = b'{"error": {"message": "context too long"}}'
    a, _ = node(Script(status=400, body=[answer]))
    b, upstream_b = node(port=2)
    sink = await run(dispatcher(a, b))
    assert (sink.status, sink.body) == (400, answer)
    assert failures(a) == 0 and not upstream_b.requests


async def test_lbs_own_resource_limits_are_503_and_no_verdict(autojump_clock: Any) -> None:
    a, _ = node(Script(fail=LocalResourceError("EMFILE")))
    with pytest.raises(LocalResourcesExhausted) as caught:
        await run(dispatcher(a))
    assert caught.value.status == 503
    assert failures(a) == 0 and a.breaker.consecutive_failures == 0


# --- timeouts and the deadline ---------------------------------------------------------------


async def test_a_long_non_stream_generation_is_not_a_timeout(autojump_clock: Any) -> None:
    """ATTEMPT_TIMEOUT_SECS bounds connect and send; the generation runs to the deadline."""
    a, _ = node(Script(head_after=300.0))
    start = trio.current_time()
    sink = await run(dispatcher(a, attempt_timeout=60.0, request_timeout=600.0))
    assert sink.body == OK_BODY and trio.current_time() - start == pytest.approx(300.0)
    assert failures(a) == 0


async def test_a_stream_without_a_head_in_time_fails_over(autojump_clock: Any) -> None:
    a, _ = node(Script(headers=list(SSE), head_after=100.0, body=[EVENT, DONE]))
    b, _ = node(sse(EVENT, DONE), port=2)
    sink = await run(dispatcher(a, b, attempt_timeout=60.0), intent(stream=True))
    assert sink.body == EVENT + DONE
    assert failures(a) == 1 and a.last_error == "no response within 60s"


async def test_the_deadline_is_a_504_and_no_verdict(autojump_clock: Any) -> None:
    a, _ = node(Script(head_after=1000.0))
    with pytest.raises(DeadlineExceeded) as caught:
        await run(dispatcher(a), intent(budget=5.0))
    assert caught.value.status == 504
    assert trio.current_time() == pytest.approx(5.0, abs=0.01)
    assert failures(a) == 0


async def test_queueing_for_capacity_then_429_is_never_a_failure(autojump_clock: Any) -> None:
    a, _ = node(Script(head_after=100.0), capacity=1)
    d = dispatcher(a, queue_timeout=10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, d)
        await trio.sleep(1)
        with pytest.raises(CapacityExceeded) as caught:
            await run(d)
        assert caught.value.retry_after == 1
        assert trio.current_time() == pytest.approx(11.0)
    assert failures(a) == 0


async def test_a_queued_request_takes_the_slot_freed(autojump_clock: Any) -> None:
    a, upstream = node(Script(head_after=5.0), capacity=1)
    d = dispatcher(a, queue_timeout=10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, d)
        await trio.sleep(1)
        sink = await run(d)
    assert sink.body == OK_BODY and len(upstream.requests) == 2


async def test_an_open_breaker_leaves_no_healthy_node(autojump_clock: Any) -> None:
    a, _ = node(Script(status=503, body=[b"{}"]))
    d = dispatcher(a)
    for _ in range(3):
        with pytest.raises(AllUpstreamsFailed):
            await run(d)
    with pytest.raises(NoHealthyNode):
        await run(d)


# --- streams ---------------------------------------------------------------------------------


async def test_a_stream_goes_through_event_by_event(autojump_clock: Any) -> None:
    a, _ = node(sse(EVENT, 1.0, EVENT, DONE))
    sink = await run(dispatcher(a), intent(stream=True))
    assert sink.body == EVENT + EVENT + DONE and sink.writes == 3
    assert a.breaker.consecutive_failures == 0


async def test_an_event_split_across_reads_is_held_until_whole(autojump_clock: Any) -> None:
    a, _ = node(sse(EVENT[:5], EVENT[5:] + EVENT[:3], EVENT[3:], DONE))
    sink = await run(dispatcher(a), intent(stream=True))
    assert sink.body == EVENT + EVENT + DONE and sink.writes == 3


async def test_a_node_dying_mid_event_never_glues_the_error_onto_it(
    autojump_clock: Any,
) -> None:
    a, _ = node(sse(EVENT, b"data: {\"choi", UpstreamClosed("gone")))
    with pytest.raises(UpstreamStreamError) as caught:
        await run(dispatcher(a), intent(stream=True))
    # The half event is dropped: the client has whole events, then the error event follows.
    assert caught.value.message == f"Node {a.key} closed the connection mid-stream"
    assert failures(a) == 1


async def test_a_stream_that_breaks_before_its_first_event_fails_over(
    autojump_clock: Any,
) -> None:
    a, _ = node(sse(b"data: {\"choi", UpstreamClosed("gone")))
    b, _ = node(sse(EVENT, DONE), port=2)
    sink = await run(dispatcher(a, b), intent(stream=True))
    assert sink.body == EVENT + DONE and failures(a) == 1


async def test_a_stream_gone_quiet_is_the_nodes_failure(autojump_clock: Any) -> None:
    a, upstream = node(sse(EVENT, 1000.0, DONE))
    sink = RecordingSink()
    with pytest.raises(UpstreamStreamError) as caught:
        await dispatcher(a, stream_idle_timeout=30.0).execute(intent(stream=True), sink, trace())
    assert caught.value.message == f"Node {a.key} stream went idle (nothing for 30s)"
    assert sink.body == EVENT and failures(a) == 1 and upstream.aborted == 1
    assert 27.0 <= trio.current_time() <= 30.0


async def test_done_then_a_dropped_connection_is_a_success(autojump_clock: Any) -> None:
    a, _ = node(sse(EVENT, DONE, UpstreamClosed("context full")))
    sink = await run(dispatcher(a), intent(stream=True))
    assert sink.body == EVENT + DONE and failures(a) == 0


async def test_a_close_delimited_stream_without_done_is_a_failure(autojump_clock: Any) -> None:
    a, _ = node(Script(headers=list(SSE_CLOSE_DELIMITED), body=[EVENT]))
    with pytest.raises(UpstreamStreamError, match="before \\[DONE\\]"):
        await run(dispatcher(a), intent(stream=True))
    assert failures(a) == 1


async def test_a_client_that_stops_reading_is_not_the_nodes_failure(
    autojump_clock: Any,
) -> None:
    """The write blocks past the idle timeout: the node was not idle, the client was."""
    a, upstream = node(sse(EVENT, EVENT, DONE))
    sink = RecordingSink(stall_after=1)
    d = dispatcher(a, stream_idle_timeout=30.0)
    for _ in range(3):
        sink = RecordingSink(stall_after=1)
        with pytest.raises(ClientGone):
            await d.execute(intent(stream=True), sink, trace())
    assert failures(a) == 0 and a.breaker.allows(trio.current_time())
    assert upstream.aborted == 3  # the node's connection was closed each time
    assert a.inflight == 0  # and its slot freed


async def test_a_stream_past_the_deadline_ends_in_a_504_event(autojump_clock: Any) -> None:
    a, _ = node(sse(EVENT, 100.0, DONE))
    sink = RecordingSink()
    with pytest.raises(DeadlineExceeded):
        await dispatcher(a).execute(intent(stream=True, budget=50.0), sink, trace())
    assert sink.committed and sink.body == EVENT and failures(a) == 0


async def test_the_callers_body_is_not_mutated(autojump_clock: Any) -> None:
    a, upstream = node()
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    request = intent(model="auto", body=body, raw=orjson.dumps(body))
    await run(dispatcher(a), request)
    assert body["model"] == "auto"
    assert orjson.loads(upstream.requests[0]["body"])["model"] == MODEL


def test_every_lb_error_has_a_status_and_code() -> None:
    for cls in (AllUpstreamsFailed, RateLimited, NoHealthyNode, UpstreamStreamError):
        assert issubclass(cls, LBError) and cls.status >= 400 and cls.code


async def test_a_stream_cut_by_the_end_of_a_drain_ends_with_shutting_down(
    autojump_clock: Any,
) -> None:
    a, _ = node(sse(EVENT, 100.0, DONE))
    sink = RecordingSink()
    d = dispatcher(a)
    raised: list[BaseException] = []

    async def execute() -> None:
        try:
            await d.execute(intent(stream=True), sink, trace())
        except LBError as exc:
            raised.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(execute)
        await trio.sleep(10)
        assert sink.drain_scope is not None
        sink.drain_scope.cancel()  # what the server does when the drain's grace ends
    assert [type(exc) for exc in raised] == [ShuttingDown]
    assert sink.committed and sink.body == EVENT and failures(a) == 0


async def test_a_node_that_sent_retry_after_is_not_asked_again_before_it_expires(
    autojump_clock: Any,
) -> None:
    busy = [(b"content-type", b"application/json"), (b"retry-after", b"20")]
    a, upstream = node(Script(status=429, headers=busy, body=[b"{}"]), Script())
    d = dispatcher(a)
    with pytest.raises(RateLimited):
        await run(d)
    await trio.sleep(10)
    with pytest.raises(RateLimited) as caught:  # answered by lb: the node is not asked
        await run(d)
    assert caught.value.retry_after == pytest.approx(10.0)
    assert len(upstream.requests) == 1
    await trio.sleep(10)
    assert (await run(d)).body == OK_BODY  # expired: asked again
    assert failures(a) == 0


async def test_the_nodes_own_request_id_comes_back_as_x_upstream_request_id(
    autojump_clock: Any,
) -> None:
    a, _ = node(Script(headers=[*JSON, (b"x-request-id", b"node-7")]))
    sink = await run(dispatcher(a))
    assert (b"x-upstream-request-id", b"node-7") in sink.headers
    assert all(key != b"x-request-id" for key, _ in sink.headers)


async def test_breaker_openings_and_closings_are_logged(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = node(*[Script(status=500, body=[b"{}"])] * 3, Script())
    d = dispatcher(a)
    for _ in range(3):
        with pytest.raises(AllUpstreamsFailed):
            await run(d)
    assert f"breaker of {a.key} opened" in caplog.text
    await trio.sleep(31)  # half-open: the probe goes through and succeeds
    await run(d)
    assert f"breaker of {a.key} closed: request req-1 succeeded" in caplog.text
    assert "attempt 1 on" in caplog.text and "request req-1" in caplog.text


async def test_a_close_delimited_stream_dying_inside_an_event_drops_the_half_event(
    autojump_clock: Any,
) -> None:
    a, _ = node(Script(headers=list(SSE_CLOSE_DELIMITED), body=[EVENT, b'data: {"partial']))
    sink = RecordingSink()
    with pytest.raises(UpstreamStreamError, match="before \\[DONE\\]"):
        await dispatcher(a).execute(intent(stream=True), sink, trace())
    assert sink.body == EVENT  # the error event follows a whole event, nothing glued


async def test_plan_reads_latency_figures_only_for_the_strategies_that_need_them() -> None:
    a, _ = node(port=1)
    b, _ = node(port=2)
    d = dispatcher(a, b, routing_strategy="LEAST_LOADED")
    d.plan(intent())
    d.plan(intent(strategy=Strategy.P2C))
    assert not d.latency.active  # nothing is recorded for strategies that do not read it
    d.plan(intent(strategy=Strategy.LATENCY_OPTIMIZED))
    assert d.latency.active


async def test_plan_orders_by_the_requests_strategy_and_prices() -> None:
    cheap = Node.create(
        NodeConfig("http://10.0.0.9:8000", labels={"price_in": "1", "price_out": "2"}),
        capacity=0, breaker_threshold=3, breaker_ttl=30.0, upstream=ScriptedNode(deque()),
    )
    dear = Node.create(
        NodeConfig("http://10.0.0.8:8000", labels={"price": "5"}),
        capacity=0, breaker_threshold=3, breaker_ttl=30.0, upstream=ScriptedNode(deque()),
    )
    d = dispatcher(dear, cheap)  # ROUND_ROBIN
    for _ in range(3):
        plan = d.plan(intent(strategy=Strategy.COST_OPTIMIZED))
        assert [n.key for n in plan.candidates] == [cheap.key, dear.key]
        plan = d.plan(intent(strategy=Strategy.FAILOVER))
        assert [n.key for n in plan.candidates] == [dear.key, cheap.key]


# --- a node's own timeouts (a catalogue deployment's `timeout`, `stream_timeout`) -----------


def timed_node(
    *scripts: Script, port: int, timeout: float | None = None,
    stream_timeout: float | None = None,
) -> tuple[Node, ScriptedNode]:
    upstream = ScriptedNode(deque(scripts))
    created = Node.create(
        NodeConfig(f"http://10.0.0.{port}:8000", timeout=timeout, stream_timeout=stream_timeout),
        capacity=0, breaker_threshold=3, breaker_ttl=30.0, upstream=upstream,
    )
    return created, upstream


async def test_a_nodes_own_timeout_bounds_its_whole_answer(autojump_clock: Any) -> None:
    # The head comes at 20 s: inside ATTEMPT_TIMEOUT_SECS (60), past the node's own 10.
    slow, _ = timed_node(Script(head_after=20.0), port=1, timeout=10.0)
    fast, _ = timed_node(Script(), port=2)
    started = trio.current_time()
    sink = await run(dispatcher(slow, fast, routing_strategy="FAILOVER"))
    assert sink.status == 200 and sink.tags[b"x-routed-node"] == fast.key.encode()
    assert trio.current_time() - started == pytest.approx(10.0, abs=0.01)
    assert failures(slow) == 1 and "its timeout of 10s" in slow.last_error


async def test_a_nodes_own_stream_timeout_bounds_its_gaps(autojump_clock: Any) -> None:
    gap = sse(b'data: {"choices":[]}\n\n', tail=5.0)
    quiet, _ = timed_node(gap, port=1, stream_timeout=2.0)
    with pytest.raises(UpstreamStreamError, match="nothing for 2s"):
        await run(dispatcher(quiet), intent(stream=True))
