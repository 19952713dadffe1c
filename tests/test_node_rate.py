"""A deployment's own rpm/tpm: the pure windows (hypothesis), dispatch on the autojump clock
(another node, queueing until the window frees a slot, 429 with Retry-After), and lb on real
sockets with the openai SDK (a catalogue's `rpm`, a `nodes:` entry's `tpm`)."""

from __future__ import annotations

import copy
from collections import deque
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import trio
import trio.testing
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.cluster.node import Node
from lb.cluster.registry import Registry
from lb.config import NodeConfig, Settings, load_settings
from lb.errors import RateLimited
from lb.obs.observer import Observers, Trace
from lb.routing.dispatch import Dispatcher
from lb.routing.eligibility import Reason, eligibility
from lb.routing.intent import RouteRequest
from lb.routing.node_rate import NodeRate, NodeRateObserver
from tests.harness import start_lb_with, start_mock
from tests.test_dispatch import RecordingSink, Script, ScriptedNode

MODEL = "m1"

# --- the pure part -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    rpm=st.integers(1, 8),
    tpm=st.integers(20, 400),
    steps=st.lists(
        st.tuples(st.floats(0, 40), st.integers(1, 120), st.integers(0, 300)), max_size=60
    ),
)
def test_never_more_than_the_limits_in_any_minute(
    rpm: int, tpm: int, steps: list[tuple[float, int, int]],
) -> None:
    """Requests arrive (gap, prompt estimate, real usage); each goes when `wait` says 0 and is
    settled at once. In any 60 s no more than rpm requests went, and each went only when the
    window (real usage of those before it) had room for its estimate."""
    rate = NodeRate(rpm, tpm)
    now = 0.0
    sent: list[tuple[float, int]] = []  # (time, tokens counted after settling)
    for n, (gap, tokens, usage) in enumerate(steps):
        now += gap
        wait = rate.wait(now, tokens)
        if wait > 0:
            # Refused only when the window is truly full, and it frees exactly `wait` later.
            recent = [(at, used) for at, used in sent if at > now - 60]
            weight = min(tokens, tpm)
            assert len(recent) >= rpm or sum(used for _, used in recent) + weight > tpm
            # It fits once `wait` has passed (give or take the floats' rounding), not before.
            # (Probed on copies: a window forgets what it expires.)
            assert copy.deepcopy(rate).wait(now + wait + 1e-9, tokens) == 0
            if wait > 1e-3:
                assert copy.deepcopy(rate).wait(now + wait - 1e-3, tokens) > 0
            continue
        recent = [(at, used) for at, used in sent if at > now - 60]
        assert len(recent) < rpm and sum(used for _, used in recent) + min(tokens, tpm) <= tpm
        rate.take(now, f"r{n}", tokens)
        rate.settle(f"r{n}", usage, now)
        sent.append((now, usage))
    for at, _ in sent:  # any window starting at an admission holds at most rpm of them
        assert sum(1 for other, _ in sent if at <= other < at + 60) <= rpm


@given(rpm=st.integers(1, 1000), instances=st.integers(1, 12))
def test_a_fleets_shares_never_add_up_to_more_than_the_limit(rpm: int, instances: int) -> None:
    rate = NodeRate(rpm, rpm * 10)
    rate.share(instances)
    assert rate.requests is not None and rate.tokens is not None
    assert rate.requests.limit * instances <= max(rpm, instances)  # at least 1 each
    assert rate.tokens.limit * instances <= max(rpm * 10, instances)
    rate.share(1)
    assert rate.requests.limit == rpm


def test_an_unsettled_estimate_stays_counted_and_unknown_usage_keeps_it() -> None:
    rate = NodeRate(None, 100)
    rate.take(0.0, "a", 60)
    assert rate.wait(1.0, 50) == pytest.approx(59.0)  # 60 + 50 > 100 until `a` leaves
    rate.settle("a", None, 1.0)  # no usage reported: the estimate stands
    assert rate.wait(1.0, 50) > 0
    rate.take(2.0, "b", 30)
    rate.settle("b", 5, 3.0)  # the real figure replaces the estimate
    assert rate.tokens is not None and rate.tokens.used(3.0) == 65


# --- dispatch on the autojump clock --------------------------------------------------------


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def usage_body(prompt: int, completion: int) -> bytes:
    return orjson.dumps({
        "choices": [{"message": {"role": "assistant", "content": "x"}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
    })


def limited(port: int, *, rpm: int | None = None, tpm: int | None = None,
            script: Script | None = None) -> tuple[Node, ScriptedNode]:
    upstream = ScriptedNode(deque([script or Script()]))
    node = Node.create(
        NodeConfig(f"http://10.0.0.{port}:8000", rpm=rpm, tpm=tpm), capacity=0,
        breaker_threshold=3, breaker_ttl=30.0, upstream=upstream,
    )
    return node, upstream


def dispatcher(*nodes: Node, **options: Any) -> Dispatcher:
    settings = Settings(**{"routing_strategy": "FAILOVER", **options})
    registry = Registry(nodes)
    for each in nodes:
        registry.update(each, models=[MODEL], healthy=True)
    return Dispatcher(
        registry, settings, observer=Observers([NodeRateObserver(registry.nodes.get)])
    )


async def send(d: Dispatcher, n: int) -> RecordingSink:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    intent = RouteRequest(
        model=MODEL, kind="chat", stream=False, body=body, raw=orjson.dumps(body),
        request_id=f"req-{n}", arrival=trio.current_time(),
    )
    sink = RecordingSink()
    await d.execute(intent, sink, Trace(f"req-{n}", "chat", False, MODEL, intent.arrival))
    return sink


async def test_a_node_at_its_rpm_gives_way_to_the_other(autojump_clock: Any) -> None:
    a, up_a = limited(1, rpm=2)
    b, up_b = limited(2)
    d = dispatcher(a, b)
    for n in range(5):
        sink = await send(d, n)
        assert sink.status == 200
    assert (len(up_a.requests), len(up_b.requests)) == (2, 3)
    assert eligibility(a, MODEL, trio.current_time()) is Reason.RATE_LIMITED
    await trio.sleep(60)  # the window has let both go
    assert eligibility(a, MODEL, trio.current_time()) is Reason.ELIGIBLE
    await send(d, 9)
    assert len(up_a.requests) == 3


async def test_alone_at_its_rpm_429_with_retry_after(autojump_clock: Any) -> None:
    a, up_a = limited(1, rpm=2)
    d = dispatcher(a)
    await send(d, 0)
    await trio.sleep(10)
    await send(d, 1)
    with pytest.raises(RateLimited) as refused:
        await send(d, 2)
    assert refused.value.retry_after == pytest.approx(50.0)  # the first leaves the window
    assert len(up_a.requests) == 2


async def test_queued_until_the_window_frees_a_slot(autojump_clock: Any) -> None:
    """QUEUE_TIMEOUT_SECS long enough: the third request waits for the first to leave the
    window (a timed wake-up: no slot is released meanwhile) and then goes."""
    a, up_a = limited(1, rpm=2)
    d = dispatcher(a, queue_timeout=90.0)
    start = trio.current_time()
    async with trio.open_nursery() as clients:
        for n in range(3):
            clients.start_soon(send, d, n)
    assert len(up_a.requests) == 3
    assert trio.current_time() - start == pytest.approx(60.0)


async def test_a_queue_too_short_for_the_window_is_429(autojump_clock: Any) -> None:
    a, up_a = limited(1, rpm=1)
    d = dispatcher(a, queue_timeout=20.0)
    await send(d, 0)
    await trio.sleep(30)
    with pytest.raises(RateLimited) as refused:  # it would free in 30 s, the queue allows 20
        await send(d, 1)
    assert refused.value.retry_after == pytest.approx(30.0)
    assert len(up_a.requests) == 1


async def test_queued_on_a_busy_node_wakes_for_a_window(autojump_clock: Any) -> None:
    """b is free but full (one slot, held); a is at its rpm: the queued request takes a as
    soon as its window frees, without waiting for b's slot."""
    a, up_a = limited(1, rpm=1)
    b, _ = limited(2, script=Script(head_after=300.0))
    b.capacity = 1
    d = dispatcher(a, b, queue_timeout=120.0)
    await send(d, 0)  # a's one request this minute
    async with trio.open_nursery() as clients:
        clients.start_soon(send, d, 1)  # holds b for 300 s
        await trio.sleep(1)
        started = trio.current_time()
        sink = await send(d, 2)
        assert sink.status == 200
        assert trio.current_time() - started == pytest.approx(59.0)
        clients.cancel_scope.cancel()
    assert len(up_a.requests) == 2


async def test_tokens_are_settled_with_the_real_usage(autojump_clock: Any) -> None:
    """tpm=100: the prompt estimate (~20) fits, the answer's usage (90) is what the window
    keeps, so the next request no longer fits on a and goes to b."""
    a, up_a = limited(1, tpm=100, script=Script(
        headers=[(b"content-type", b"application/json")], body=[usage_body(10, 80)]
    ))
    b, up_b = limited(2)
    d = dispatcher(a, b)
    await send(d, 0)
    await send(d, 1)
    assert (len(up_a.requests), len(up_b.requests)) == (1, 1)
    assert a.rate is not None and a.rate.tokens is not None
    assert a.rate.tokens.used(trio.current_time()) == 90 and not a.rate.holds


# --- real sockets, the openai SDK ----------------------------------------------------------


def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_a_catalogue_deployments_rpm(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Two deployments of one group, the first with rpm 2: it gets two requests, the others
    go to the second; alone (a group of one) the third is 429 with Retry-After."""
    a = await start_mock(nursery, models=(MODEL,))
    b = await start_mock(nursery, models=(MODEL,))
    c = await start_mock(nursery, models=(MODEL,))
    config = write(tmp_path, {"model_list": [
        {"model_name": "chat", "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": f"{a.url}/v1", "rpm": 2, "order": 1}},
        {"model_name": "chat", "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": f"{b.url}/v1", "order": 2}},
        {"model_name": "solo", "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": f"{c.url}/v1", "rpm": 2}},
    ]})
    settings = load_settings(config_file=config, env={"ROUTING_STRATEGY": "FAILOVER"})
    lb = await start_lb_with(nursery, settings)
    client = openai.AsyncOpenAI(base_url=f"{lb.url}/v1", api_key="test", max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    with trio.fail_after(20):
        for _ in range(5):
            await client.chat.completions.create(model="chat", messages=messages)
        assert (await a.chats(), await b.chats()) == (2, 3)
        for _ in range(2):
            await client.chat.completions.create(model="solo", messages=messages)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="solo", messages=messages)
    assert await c.chats() == 2
    retry_after = float(refused.value.response.headers["retry-after"])
    assert 0 < retry_after <= 60
    assert refused.value.response.json()["error"]["type"]


async def test_a_nodes_entrys_tpm_counts_the_real_usage(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """`nodes:` with tpm 150 on a node whose answers are 200 tokens long: after one answer
    (streamed, usage at the end) its window is over, the next requests go to the other."""
    a = await start_mock(nursery, models=(MODEL,), tokens=200)
    b = await start_mock(nursery, models=(MODEL,), tokens=5)
    config = write(tmp_path, {"nodes": [{"url": a.url, "tpm": 150}, {"url": b.url}]})
    settings = load_settings(config_file=config, env={"ROUTING_STRATEGY": "FAILOVER"})
    assert settings.nodes[0].tpm == 150
    lb = await start_lb_with(nursery, settings)
    client = openai.AsyncOpenAI(base_url=f"{lb.url}/v1", api_key="test", max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    with trio.fail_after(20):
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, stream=True,
            stream_options={"include_usage": True},
        )
        usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
        assert usage[0].completion_tokens == 200
        for _ in range(3):
            await client.chat.completions.create(model=MODEL, messages=messages)
    assert (await a.chats(), await b.chats()) == (1, 3)


def test_a_nodes_entrys_limits_are_checked(tmp_path: Path) -> None:
    config = write(tmp_path, {"nodes": [{"url": "http://127.0.0.1:9", "rpm": 0}]})
    with pytest.raises(Exception, match="rpm must be a whole number > 0"):
        load_settings(config_file=config)


def test_a_fleet_shares_each_nodes_limits() -> None:
    """The fleet's live instances (learnt at each sync) cut every limited node's windows,
    nodes added later included; unlimited nodes have none."""
    a, _ = limited(1, rpm=60, tpm=6000)
    b, _ = limited(2)
    registry = Registry([a, b])
    registry.share_rates(3)
    assert a.rate is not None and a.rate.requests is not None and a.rate.tokens is not None
    assert (a.rate.requests.limit, a.rate.tokens.limit) == (20, 2000) and b.rate is None
    c, _ = limited(3, rpm=10)
    registry.add(c)
    assert c.rate is not None and c.rate.requests is not None
    assert c.rate.requests.limit == 3
    registry.share_rates(1)
    assert (a.rate.requests.limit, c.rate.requests.limit) == (60, 10)
