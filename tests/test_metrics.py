"""`/metrics`: the Metrics observer on hand-made traces, the collector's view of the registry,
and end to end (the openai SDK -> lb -> mock nodes, then Prometheus' own parser on /metrics)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx
import openai
import orjson
import pytest
import trio
from harness import CHAT, Running, start_lb, start_mock
from harness import sdk as sdk_for
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lb.cluster.node import Node
from lb.cluster.registry import Registry
from lb.config import NodeConfig, load_settings
from lb.obs.metrics import BUCKETS, Histogram, Metrics, MetricsCollector
from lb.obs.observer import Outcome, Trace

MODEL = "llama-3.1-8b"
EMBED = "nomic-embed-text"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Scrape:
    """An exposition as Prometheus' parser reads it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (a PromQL sum)."""
        return sum(
            value for sample, found, value in self.samples
            if sample == name and labels.items() <= found.items()
        )

    def series(self, name: str) -> list[dict[str, str]]:
        return [found for sample, found, _ in self.samples if sample == name]

    def names(self) -> set[str]:
        return {sample for sample, _, _ in self.samples}


def scrape_of(metrics: Metrics, registry: Registry | None = None, litellm: bool = True) -> Scrape:
    exposition = CollectorRegistry()
    exposition.register(MetricsCollector(metrics, registry or Registry(), litellm=litellm))
    return Scrape(generate_latest(exposition).decode())


def trace(**fields: Any) -> Trace:
    values: dict[str, Any] = {
        "request_id": "r", "kind": "chat", "stream": False, "requested_model": MODEL,
        "arrival": 0.0, "model": MODEL, "node": "10.0.0.1:8000", "attempts": 1, "status": 200,
        "sent_to_node": 0.0004, "duration": 0.3,
    }
    values.update(fields)
    return Trace(**values)


def finish(metrics: Metrics, *traces: Trace) -> None:
    for each in traces:
        metrics.started(each)
        for _ in range(each.attempts):
            metrics.attempt_finished(each, each.node or "", Outcome.SUCCESS, each.status, 0.1)
        metrics.finished(each)


# --- the observer, on hand-made traces --------------------------------------------------------


def test_histogram_buckets_include_their_bound() -> None:
    histogram = Histogram()
    for value in (0.0, 0.01, 0.0100001, 600.0, 601.0, 1e9):
        histogram.observe(value)
    cumulative = dict(histogram.cumulative())
    assert cumulative["0.01"] == 2  # le means <=
    assert cumulative["0.025"] == 3
    assert cumulative["600.0"] == 4
    assert cumulative["+Inf"] == 6 == histogram.count
    assert list(cumulative) == [*(repr(bound) for bound in BUCKETS), "+Inf"]
    assert histogram.total == pytest.approx(0.0200001 + 1201 + 1e9)


def test_a_finished_stream_counts_everywhere_once() -> None:
    metrics = Metrics()
    finish(metrics, trace(
        stream=True, first_byte=0.05, last_byte=0.45, chunks=5, prompt_tokens=12,
        completion_tokens=30, duration=0.5, queue_wait=0.2,
    ))
    scrape = scrape_of(metrics)
    assert scrape.value("lb_requests_total", model=MODEL, node="10.0.0.1:8000", status="200") == 1
    assert scrape.series("lb_request_failures_total") == []
    assert scrape.value("lb_request_duration_seconds_count", model=MODEL) == 1
    assert scrape.value("lb_request_duration_seconds_bucket", model=MODEL, le="0.25") == 0
    assert scrape.value("lb_request_duration_seconds_bucket", model=MODEL, le="0.5") == 1
    assert scrape.value("lb_time_to_first_token_seconds_bucket", model=MODEL, le="0.05") == 1
    assert scrape.value("lb_time_to_first_token_seconds_sum", model=MODEL) == 0.05
    # (last - first) / (chunks - 1)
    assert scrape.value("lb_inter_token_latency_seconds_sum", model=MODEL) == pytest.approx(0.1)
    assert scrape.value("lb_queue_wait_seconds_count", model=MODEL) == 1
    assert scrape.value("lb_overhead_seconds_count") == 1
    assert scrape.value("lb_overhead_seconds_bucket", le="0.01") == 1
    assert scrape.value("lb_prompt_tokens_total", model=MODEL) == 12
    assert scrape.value("lb_completion_tokens_total", model=MODEL) == 30
    assert scrape.value("lb_tokens_total", model=MODEL) == 42
    assert scrape.value("lb_attempts_total", node="10.0.0.1:8000", outcome="success") == 1
    assert scrape.value("lb_attempts_per_request_bucket", le="1.0") == 1
    assert scrape.value("lb_failovers_total", model=MODEL) == 0
    assert scrape.value("lb_client_disconnects_total", model=MODEL) == 0


def test_what_a_request_did_not_do_is_not_observed() -> None:
    metrics = Metrics()
    # A non-stream answer has a first byte too, but TTFT is for streams; one chunk: no ITL;
    # no wait: no queue time; no attempt: no overhead.
    finish(metrics, trace(first_byte=0.2, last_byte=0.2, chunks=1))
    finish(metrics, trace(stream=True, first_byte=0.1, last_byte=0.1, chunks=1))
    finish(metrics, trace(model=None, node=None, attempts=0, sent_to_node=None, status=404,
                          error="model_not_found"))
    scrape = scrape_of(metrics)
    assert scrape.value("lb_time_to_first_token_seconds_count") == 1
    assert scrape.series("lb_inter_token_latency_seconds_count") == []
    assert scrape.series("lb_queue_wait_seconds_count") == []
    assert scrape.value("lb_overhead_seconds_count") == 2
    assert scrape.value("lb_attempts_per_request_count") == 2
    assert scrape.value("lb_request_duration_seconds_count") == 3


def test_labels_are_bounded_whatever_the_client_sent() -> None:
    metrics = Metrics(frozenset({"auto", "default"}))
    finish(
        metrics,
        trace(requested_model="AUTO"),  # a sentinel, in any case: as configured
        trace(requested_model=MODEL.upper()),  # the model in other case: the model
        trace(requested_model="whatever-the-client-sent", model=None, node=None, attempts=0,
              status=404, error="model_not_found"),
    )
    scrape = scrape_of(metrics)
    assert scrape.value("litellm_proxy_total_requests_metric_total", model=MODEL,
                        requested_model="auto", status_code="200") == 1
    assert scrape.value("litellm_proxy_total_requests_metric_total", model=MODEL,
                        requested_model=MODEL, status_code="200") == 1
    assert scrape.value("lb_requests_total", model="", node="", status="404") == 1
    assert scrape.value("litellm_proxy_total_requests_metric_total", model="",
                        requested_model="", status_code="404") == 1
    assert "whatever" not in scrape.text and MODEL.upper() not in scrape.text
    labels = {key for _, found, _ in scrape.samples for key in found}
    assert labels <= {"model", "requested_model", "node", "status", "status_code", "code",
                      "exception_status", "outcome", "le"}
    # Requests that resolved no model count as requests, and nowhere else.
    assert {found["model"] for found in scrape.series("lb_tokens_total")} == {MODEL}


def test_a_failed_request_is_counted_once_with_its_code() -> None:
    metrics = Metrics()
    node = "10.0.0.1:8000"
    finish(
        metrics,
        trace(status=502, error="all_upstreams_failed", attempts=3, failovers=2),
        trace(stream=True, status=200, error="upstream_stream_error", first_byte=0.1),
        trace(status=422),  # the node's own 4xx, passed through
        trace(status=499, client_gone=True),
        trace(status=200, client_gone=True, stream=True, first_byte=0.1),  # left mid-stream
    )
    scrape = scrape_of(metrics)
    assert scrape.value("lb_request_failures_total") == 4
    assert scrape.value("lb_request_failures_total", model=MODEL, node=node,
                        code="all_upstreams_failed") == 1
    assert scrape.value("lb_request_failures_total", code="upstream_stream_error") == 1
    assert scrape.value("lb_request_failures_total", code="http_422") == 1
    assert scrape.value("lb_request_failures_total", code="client_closed") == 1
    # LiteLLM's exception_status is a status: a stream's error after its 200 head is a 502.
    assert scrape.value("litellm_proxy_failed_requests_metric_total", model=MODEL,
                        requested_model=MODEL, exception_status="502") == 2
    assert scrape.value("litellm_proxy_failed_requests_metric_total",
                        exception_status="422") == 1
    assert scrape.value("lb_failovers_total", model=MODEL) == 2
    assert scrape.value("lb_client_disconnects_total", model=MODEL) == 2
    assert scrape.value("lb_attempts_per_request_bucket", le="2.0") == 4
    assert scrape.value("lb_attempts_per_request_bucket", le="3.0") == 5
    assert scrape.value("lb_attempts_per_request_sum") == 7


def test_attempts_by_node_and_outcome() -> None:
    metrics = Metrics()
    request = trace()
    for node, outcome in [("a:1", Outcome.FAILURE), ("b:1", Outcome.BUSY),
                          ("b:1", Outcome.SUCCESS), ("a:1", Outcome.NO_VERDICT)]:
        metrics.attempt_finished(request, node, outcome, None, 0.1)
    scrape = scrape_of(metrics)
    assert {
        (found["node"], found["outcome"]): value for sample, found, value in scrape.samples
        if sample == "lb_attempts_total"
    } == {("a:1", "failure"): 1, ("b:1", "busy"): 1, ("b:1", "success"): 1,
          ("a:1", "no_verdict"): 1}


def test_counter_names_end_in_total_exactly_once() -> None:
    metrics = Metrics()
    finish(metrics, trace(prompt_tokens=1, completion_tokens=1))
    scrape = scrape_of(metrics)
    for name in ("lb_requests_total", "lb_tokens_total", "litellm_total_tokens_metric_total",
                 "litellm_proxy_total_requests_metric_total"):
        assert f"# TYPE {name} counter\n" in scrape.text
        assert scrape.types[name.removesuffix("_total")] == "counter"
        assert name in scrape.names()
    assert not any(name.endswith("_total_total") for name in scrape.names())
    assert "_created" not in scrape.text


def test_litellm_names_can_be_turned_off() -> None:
    metrics = Metrics()
    finish(metrics, trace(prompt_tokens=1, completion_tokens=1))
    assert any(name.startswith("litellm_") for name in scrape_of(metrics).names())
    assert not any(
        name.startswith("litellm_") for name in scrape_of(metrics, litellm=False).names()
    )


def test_node_gauges_are_read_from_the_registry_at_scrape_time() -> None:
    def make(port: int, capacity: int) -> Node:
        return Node.create(NodeConfig(f"http://10.0.0.{port}:8000"), capacity=capacity,
                           breaker_threshold=1, breaker_ttl=30.0)

    up, down, half = make(1, 4), make(2, 0), make(3, 0)
    registry = Registry([up, down, half])
    registry.update(up, models=[MODEL], healthy=True)
    half.breaker.record_failure(-31.0)  # opened 31 s before the clock's 0 outside trio
    scrape = scrape_of(Metrics(), registry)
    assert scrape.value("lb_node_up", node=up.key) == 1
    assert scrape.value("lb_node_up", node=down.key) == 0
    assert scrape.value("lb_node_capacity", node=up.key) == 4
    assert scrape.value("lb_node_capacity", node=down.key) == 0  # uncapped
    assert scrape.value("lb_node_breaker_state", node=up.key) == 0
    assert scrape.value("lb_node_breaker_state", node=half.key) == 1  # half-open after 30 s
    assert scrape.value("lb_queue_length") == 0
    assert scrape.value("lb_upstream_connections_open", node=up.key) == 0
    assert scrape.value("lb_upstream_connections_opened_total", node=up.key) == 0
    assert scrape.value("lb_upstream_retries_total", node=up.key) == 0
    # Nothing is cached: the next scrape sees the change.
    up.limiter.acquire_on_behalf_of_nowait("request")
    up.breaker.record_failure(0.0)  # the clock outside trio reads 0: open for 30 s
    registry.update(down, healthy=True)
    scrape = scrape_of(Metrics(), registry)
    assert scrape.value("lb_node_inflight", node=up.key) == 1
    assert scrape.value("lb_node_breaker_state", node=up.key) == 2
    assert scrape.value("lb_node_up", node=down.key) == 1


# --- end to end ---------------------------------------------------------------------------------


async def get_metrics(lb: Running, headers: dict[str, str] | None = None) -> Scrape:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{lb.url}/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == CONTENT_TYPE
    return Scrape(answer.text)


def usage_sum(answers: Iterable[Any], field: str) -> int:
    return sum(getattr(answer.usage, field) for answer in answers if answer.usage is not None)


async def test_every_family_counts_what_the_sdk_saw(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        bad = await start_mock(nursery, models=(MODEL, EMBED), tokens=8, itl_ms=10)
        good = await start_mock(nursery, models=(MODEL, EMBED), tokens=8, itl_ms=10)
        lb = await start_lb(nursery, [bad, good], routing_strategy="ROUND_ROBIN",
                            scan_interval=3600, breaker_threshold=0)
        client = sdk_for(lb)
        answers: list[Any] = []  # everything that reported usage

        answers.append(await client.chat.completions.create(model=MODEL, **CHAT))
        answers.append(await client.chat.completions.create(model="AUTO", **CHAT))
        answers.append(await client.chat.completions.create(model=MODEL.upper(), **CHAT))
        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, stream=True, stream_options={"include_usage": True}, **CHAT)]
        answers.append(chunks[-1])
        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, stream=True, **CHAT)]
        assert all(chunk.usage is None for chunk in chunks)
        estimated = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
        embedding = await client.embeddings.create(model=EMBED, input="hello world again")
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", **CHAT)
        with pytest.raises(openai.APIError):  # the node drops the stream after 3 events
            async for _ in await client.chat.completions.create(
                model=MODEL, stream=True, extra_headers={"x-mock-fault": "drop-after=3"}, **CHAT
            ):
                pass
        # A node-wide fault set after lb saw the node healthy (it would fail the probes too):
        # of two requests in a row, exactly one goes there first and fails over.
        async with httpx.AsyncClient() as http:
            await http.post(f"{bad.url}/mock/fault", json={"fault": "status=503"})
        for _ in range(2):
            answers.append(await client.chat.completions.create(model=MODEL, **CHAT))
        with pytest.raises(openai.APIStatusError) as failed:  # every node fails this one
            await client.chat.completions.create(
                model=MODEL, extra_headers={"x-mock-fault": "status=500"}, **CHAT
            )
        assert failed.value.status_code == 502

        scrape = await get_metrics(lb)

    requests = "lb_requests_total"
    assert scrape.value(requests) == 11
    assert scrape.value(requests, model=MODEL, status="200") == 8  # the broken stream's 200
    assert scrape.value(requests, model=MODEL, node=good.key, status="200") >= 3
    assert scrape.value(requests, model=EMBED, status="200") == 1
    assert scrape.value(requests, model="", node="", status="404") == 1
    assert scrape.value(requests, model=MODEL, status="502") == 1
    assert "no-such-model" not in scrape.text and MODEL.upper() not in scrape.text

    failures = "lb_request_failures_total"
    assert scrape.value(failures) == 3  # the 502 failed on two nodes: counted once
    assert scrape.value(failures, model="", node="", code="model_not_found") == 1
    assert scrape.value(failures, model=MODEL, code="upstream_stream_error") == 1
    assert scrape.value(failures, model=MODEL, code="all_upstreams_failed") == 1

    assert scrape.value("lb_request_duration_seconds_count", model=MODEL) == 9
    assert scrape.value("lb_request_duration_seconds_count", model=EMBED) == 1
    assert scrape.value("lb_request_duration_seconds_count", model="") == 1
    assert scrape.value("lb_request_duration_seconds_sum", model=MODEL) > 0
    assert scrape.value("lb_time_to_first_token_seconds_count", model=MODEL) == 3
    assert scrape.series("lb_time_to_first_token_seconds_count") == [{"model": MODEL}]
    assert scrape.value("lb_inter_token_latency_seconds_count", model=MODEL) == 2  # whole ones
    assert scrape.value("lb_inter_token_latency_seconds_sum", model=MODEL) > 0
    assert scrape.series("lb_queue_wait_seconds_count") == []  # nothing waited
    assert scrape.value("lb_overhead_seconds_count") == 10  # all but the 404 were sent

    prompt = usage_sum(answers, "prompt_tokens")
    completion = usage_sum(answers, "completion_tokens")
    assert prompt == 6 * 2 and completion == 6 * 8  # "hello world", 8 tokens each
    assert scrape.value("lb_prompt_tokens_total", model=MODEL) == prompt
    assert scrape.value("lb_completion_tokens_total", model=MODEL) == completion + estimated
    assert scrape.value("lb_tokens_total", model=MODEL) == prompt + completion + estimated
    assert estimated == 8
    assert embedding.usage.prompt_tokens == 3
    assert scrape.value("lb_prompt_tokens_total", model=EMBED) == 3
    assert scrape.value("lb_completion_tokens_total", model=EMBED) == 0

    attempts = "lb_attempts_total"
    assert scrape.value(attempts, outcome="success") == 8
    assert scrape.value(attempts, outcome="failure") == 4  # the broken stream, 503, 500 twice
    assert scrape.value(attempts, node=bad.key, outcome="failure") >= 2
    assert scrape.value(attempts, node=good.key, outcome="failure") >= 1
    assert scrape.value(attempts, outcome="busy") == scrape.value(attempts, outcome="no_verdict")
    assert scrape.value(attempts, outcome="busy") == 0
    assert scrape.value("lb_failovers_total", model=MODEL) == 2
    assert scrape.value("lb_attempts_per_request_count") == 10
    assert scrape.value("lb_attempts_per_request_sum") == 12
    assert scrape.value("lb_attempts_per_request_bucket", le="1.0") == 8
    assert scrape.value("lb_client_disconnects_total", model=MODEL) == 0

    for node in (bad, good):
        assert scrape.value("lb_node_up", node=node.key) == 1
        assert scrape.value("lb_node_inflight", node=node.key) == 0
        assert scrape.value("lb_node_capacity", node=node.key) == 0
        assert scrape.value("lb_node_breaker_state", node=node.key) == 0
        assert scrape.value("lb_upstream_connections_opened_total", node=node.key) >= 1
        assert scrape.value("lb_upstream_connections_open", node=node.key) >= 0
    assert scrape.value("lb_queue_length") == 0

    # LiteLLM's names: the same counts.
    total = "litellm_proxy_total_requests_metric_total"
    assert scrape.value(total) == scrape.value(requests)
    assert scrape.value(total, model=MODEL, requested_model="auto", status_code="200") == 1
    assert scrape.value(total, model=MODEL, requested_model=MODEL, status_code="200") == 7
    assert scrape.value(total, model=MODEL, requested_model=MODEL, status_code="502") == 1
    assert scrape.value(total, model=EMBED, requested_model=EMBED, status_code="200") == 1
    assert scrape.value(total, model="", requested_model="", status_code="404") == 1
    failed_total = "litellm_proxy_failed_requests_metric_total"
    assert scrape.value(failed_total) == scrape.value(failures)
    assert scrape.value(failed_total, model=MODEL, exception_status="502") == 2
    assert scrape.value(failed_total, model="", exception_status="404") == 1
    for ours, theirs in [
        ("lb_request_duration_seconds_count", "litellm_request_total_latency_metric_count"),
        ("lb_request_duration_seconds_bucket", "litellm_request_total_latency_metric_bucket"),
        ("lb_time_to_first_token_seconds_count",
         "litellm_llm_api_time_to_first_token_metric_count"),
        ("lb_tokens_total", "litellm_total_tokens_metric_total"),
        ("lb_prompt_tokens_total", "litellm_input_tokens_metric_total"),
        ("lb_completion_tokens_total", "litellm_output_tokens_metric_total"),
    ]:
        assert scrape.series(ours) == scrape.series(theirs), ours
        for found in scrape.series(ours):
            assert scrape.value(ours, **found) == scrape.value(theirs, **found), (ours, found)
    assert scrape.types["litellm_request_total_latency_metric"] == "histogram"


async def test_waiting_for_capacity_shows_in_gauges_and_queue_time(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(20):
        node = await start_mock(nursery, models=(MODEL,), ttft_ms=300)
        lb = await start_lb(nursery, [node], default_maxconn=1, queue_timeout=10)
        client = sdk_for(lb)
        async with trio.open_nursery() as requests:
            for _ in range(2):
                requests.start_soon(lambda: client.chat.completions.create(model=MODEL, **CHAT))
            while (scrape := await get_metrics(lb)).value("lb_queue_length") < 1:
                await trio.sleep(0.01)
            assert scrape.value("lb_node_inflight", node=node.key) == 1
            assert scrape.value("lb_node_capacity", node=node.key) == 1
        scrape = await get_metrics(lb)
    assert scrape.value("lb_queue_length") == 0
    assert scrape.value("lb_node_inflight", node=node.key) == 0
    assert scrape.value("lb_queue_wait_seconds_count", model=MODEL) == 1
    assert scrape.value("lb_queue_wait_seconds_sum", model=MODEL) > 0
    assert scrape.value("lb_requests_total", model=MODEL, status="200") == 2


async def test_a_client_that_leaves_is_a_499_and_a_disconnect(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        node = await start_mock(nursery, models=(MODEL,), ttft_ms=5000)
        lb = await start_lb(nursery, [node])
        body = orjson.dumps({"model": MODEL, **CHAT})
        sock = await trio.open_tcp_stream("127.0.0.1", lb.port)
        await sock.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body
        )
        while (await node.stats())["concurrent"] == 0:
            await trio.sleep(0.01)
        await sock.aclose()
        while (scrape := await get_metrics(lb)).value("lb_requests_total") == 0:
            await trio.sleep(0.01)
    assert scrape.value("lb_requests_total", model=MODEL, node=node.key, status="499") == 1
    assert scrape.value("lb_client_disconnects_total", model=MODEL) == 1
    assert scrape.value("lb_request_failures_total", code="client_closed") == 1
    assert scrape.value("lb_attempts_total", node=node.key, outcome="no_verdict") == 1


async def test_a_metrics_key_is_required_once_set(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], metrics_key="s3cret", admin_key="other")
        async with httpx.AsyncClient() as client:
            for headers in ({}, {"authorization": "Bearer wrong"},
                            {"authorization": "Bearer other"}, {"authorization": "s3cret"}):
                answer = await client.get(f"{lb.url}/metrics", headers=headers)
                assert answer.status_code == 401
                error = answer.json()["error"]
                assert error["type"] == "authentication_error"
                assert "LB_METRICS_KEY" in error["message"]
            for path in ("/metrics", "/metrics/"):
                answer = await client.get(
                    f"{lb.url}{path}", headers={"authorization": "Bearer s3cret"}
                )
                assert answer.status_code == 200  # no redirect for the slash
                assert answer.headers["content-type"] == CONTENT_TYPE
                assert "# TYPE lb_requests_total counter" in answer.text


async def test_open_by_default_with_or_without_a_slash(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], admin_key="s3cret")  # the admin key is not asked
        async with httpx.AsyncClient() as client:
            for path in ("/metrics", "/metrics/"):
                answer = await client.get(f"{lb.url}{path}")
                assert answer.status_code == 200
                assert answer.headers["content-type"] == CONTENT_TYPE
                assert "location" not in answer.headers
                assert f'lb_node_up{{node="{node.key}"}} 1.0' in answer.text


async def test_metrics_off_removes_the_route(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node], metrics=False)
        await sdk_for(lb).chat.completions.create(model=MODEL, **CHAT)  # still serves
        async with httpx.AsyncClient() as client:
            for path in ("/metrics", "/metrics/"):
                answer = await client.get(f"{lb.url}{path}")
                assert answer.status_code == 404
                assert answer.json()["error"]["code"] == "not_found"


def test_settings_come_from_the_environment() -> None:
    settings = load_settings(env={})
    assert settings.metrics and settings.litellm_metrics and settings.metrics_key == ""
    settings = load_settings(
        env={"LB_METRICS": "0", "LB_LITELLM_METRICS": "false", "LB_METRICS_KEY": "k"}
    )
    assert not settings.metrics and not settings.litellm_metrics
    assert settings.metrics_key == "k"
