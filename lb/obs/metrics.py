"""Prometheus metrics: a `Metrics` observer that counts into plain dicts and bucket arrays on
the request path, and a `MetricsCollector` that turns those, and the registry's live state, into
metric families only when Prometheus scrapes.

prometheus_client's own metric objects take a lock and a label lookup per update; the request
path here costs a few dict increments and one bisect per histogram. The exposition is still
prometheus_client's (`generate_latest`), so it is valid by construction.

Labels are bounded: the resolved model ("" when none resolved), the node (`host:port`), the
status code, the error code and the attempt's outcome; never a request id or a key. The model a
client asked for (LiteLLM's `requested_model`) is kept only if it resolved, as the model itself
or as a sentinel, so a client's arbitrary strings never become series.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import trio
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from lb import errors
from lb.cluster.breaker import BreakerState
from lb.cluster.registry import Registry
from lb.obs.observer import Observer, Outcome, Trace

# Seconds, from a cached answer to a long generation.
BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
)
ATTEMPT_BUCKETS: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 10.0)
BREAKER_STATES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
CLIENT_CLOSED = 499

K = TypeVar("K")


def _error_statuses() -> dict[str, int]:
    """Each lb error code with its status (a stream that broke after its 200 head says the code
    only; LiteLLM's `exception_status` wants a status)."""
    found: dict[str, int] = {}
    pending: list[type[errors.LBError]] = [errors.LBError]
    while pending:
        cls = pending.pop()
        if cls.code is not None:
            found.setdefault(cls.code, cls.status)
        pending.extend(cls.__subclasses__())
    return found


class Histogram:
    """Bucket counts (not cumulative; the last one is +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket i counts value <= bounds[i]
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, observations <= le) pairs, +Inf last, as the exposition wants them."""
        result = []
        running = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            result.append((_le(bound), float(running)))
        return result


class _ModelStats:
    """Everything counted per resolved model."""

    __slots__ = (
        "completion", "disconnects", "duration", "failovers", "itl", "prompt", "queue", "ttft",
    )

    def __init__(self) -> None:
        self.duration = Histogram()
        self.ttft = Histogram()
        self.itl = Histogram()
        self.queue = Histogram()
        self.prompt = 0
        self.completion = 0
        self.failovers = 0
        self.disconnects = 0


class Metrics(Observer):
    """The request observer behind `/metrics`: reads each `Trace` once, when it finished (and
    each attempt's outcome), and only counts."""

    def __init__(self, sentinels: frozenset[str] = frozenset()) -> None:
        self.sentinels = sentinels  # lower-case, as `Settings.sentinels`
        # (model, requested model, node, status) -> finished requests
        self.requests: defaultdict[tuple[str, str, str, int], int] = defaultdict(int)
        # (model, requested model, node, error code, status) -> requests that ended in an error
        self.failures: defaultdict[tuple[str, str, str, str, int], int] = defaultdict(int)
        # (node, outcome) -> attempts
        self.attempts: defaultdict[tuple[str, Outcome], int] = defaultdict(int)
        self.models: dict[str, _ModelStats] = {}
        self.overhead = Histogram()
        self.attempts_per_request = Histogram(ATTEMPT_BUCKETS)
        self._error_status = _error_statuses()

    def attempt_finished(
        self, trace: Trace, node: str, outcome: Outcome, status: int | None, seconds: float
    ) -> None:
        self.attempts[node, outcome] += 1

    def finished(self, trace: Trace) -> None:
        model = trace.model
        if model is None:  # never routed: an unknown model, a bad request
            model = requested = ""
        else:
            requested = trace.requested_model
            if requested != model:  # a sentinel (as configured), or the model in other case
                folded = requested.lower()
                requested = folded if folded in self.sentinels else model
        node = trace.node or ""
        status = trace.status or 500  # no status: lb failed itself, the server answers 500
        self.requests[model, requested, node, status] += 1
        error = trace.error
        if error is not None or status >= 400:
            if error is None:
                error = "client_closed" if status == CLIENT_CLOSED else f"http_{status}"
            elif status < 400:  # a stream that broke after its head
                status = self._error_status.get(error, 500)
            self.failures[model, requested, node, error, status] += 1
        stats = self.models.get(model)
        if stats is None:
            stats = self.models[model] = _ModelStats()
        stats.duration.observe(trace.duration)
        if trace.stream:
            first = trace.first_byte
            if first is not None:
                stats.ttft.observe(first)
                last = trace.last_byte
                if trace.chunks >= 2 and last is not None:
                    stats.itl.observe((last - first) / (trace.chunks - 1))
        if trace.queue_wait > 0:
            stats.queue.observe(trace.queue_wait)
        if trace.prompt_tokens is not None:
            stats.prompt += trace.prompt_tokens
        if trace.completion_tokens is not None:
            stats.completion += trace.completion_tokens
        stats.failovers += trace.failovers
        if trace.client_gone:
            stats.disconnects += 1
        if trace.sent_to_node is not None:
            self.overhead.observe(trace.sent_to_node)
        if trace.attempts:
            self.attempts_per_request.observe(trace.attempts)


class MetricsCollector:
    """prometheus_client's view of `Metrics` and of the registry, built at each scrape."""

    def __init__(self, metrics: Metrics, registry: Registry, *, litellm: bool = True) -> None:
        self.metrics = metrics
        self.registry = registry
        self.litellm = litellm

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        requests = metrics.requests
        failures = metrics.failures
        models = sorted(metrics.models.items())
        yield _counter(
            "lb_requests_total", "Finished requests by the status the client got (499: it left "
            "before the answer's head; node \"\": none was tried)", ("model", "node", "status"),
            _sum_by(requests, lambda k: (k[0], k[2], str(k[3]))),
        )
        yield _counter(
            "lb_request_failures_total", "Requests that ended in an error, in the answer or in "
            "the stream, once each, by error code", ("model", "node", "code"),
            _sum_by(failures, lambda k: (k[0], k[2], k[3])),
        )
        yield _histogram(
            "lb_request_duration_seconds", "Arrival to the end of the answer",
            [(model, stats.duration) for model, stats in models],
        )
        yield _histogram(
            "lb_time_to_first_token_seconds", "Streams: arrival to the first byte to the client",
            [(model, stats.ttft) for model, stats in models],
        )
        yield _histogram(
            "lb_inter_token_latency_seconds", "Streams of two chunks or more: the mean gap "
            "between two chunks to the client", [(model, stats.itl) for model, stats in models],
        )
        yield _histogram(
            "lb_queue_wait_seconds", "Requests that waited for a free node slot: how long",
            [(model, stats.queue) for model, stats in models],
        )
        overhead = HistogramMetricFamily(
            "lb_overhead_seconds", "Arrival to the request's first attempt: lb's own overhead"
        )
        overhead.add_metric([], metrics.overhead.cumulative(), metrics.overhead.total)
        yield overhead
        # Tokens and failovers need a model that resolved ("" only counts requests).
        routed = [(model, stats) for model, stats in models if model]
        yield _counter(
            "lb_prompt_tokens_total", "Prompt tokens, as the nodes reported them", ("model",),
            {(model,): stats.prompt for model, stats in routed},
        )
        yield _counter(
            "lb_completion_tokens_total", "Completion tokens, as the nodes reported them (or "
            "counted from stream events)", ("model",),
            {(model,): stats.completion for model, stats in routed},
        )
        yield _counter(
            "lb_tokens_total", "Prompt and completion tokens", ("model",),
            {(model,): stats.prompt + stats.completion for model, stats in routed},
        )
        yield _counter(
            "lb_attempts_total", "Attempts on nodes by outcome: success, failure (the node's "
            "fault), busy (429), no_verdict (ended by the client, lb or the deadline)",
            ("node", "outcome"),
            {(node, outcome.value): count for (node, outcome), count in metrics.attempts.items()},
        )
        yield _counter(
            "lb_failovers_total", "Attempts after a failed or busy one", ("model",),
            {(model,): stats.failovers for model, stats in routed},
        )
        per_request = HistogramMetricFamily("lb_attempts_per_request", "Attempts per request")
        per_request.add_metric(
            [], metrics.attempts_per_request.cumulative(), metrics.attempts_per_request.total
        )
        yield per_request
        yield _counter(
            "lb_client_disconnects_total", "Requests whose client left before the end",
            ("model",), {(model,): stats.disconnects for model, stats in routed},
        )
        yield from self._nodes()
        if self.litellm:
            yield from _litellm(metrics, models, routed)

    def _nodes(self) -> Iterator[Metric]:
        """The registry's live state, per node."""
        registry = self.registry
        nodes = sorted(registry.nodes.items())
        now = _now()
        gauges = {
            "inflight": GaugeMetricFamily(
                "lb_node_inflight", "Requests in flight on the node", labels=("node",)),
            "capacity": GaugeMetricFamily(
                "lb_node_capacity", "This instance's cap for the node (0: none)", labels=("node",)),
            "up": GaugeMetricFamily("lb_node_up", "1 if the node is healthy", labels=("node",)),
            "breaker": GaugeMetricFamily(
                "lb_node_breaker_state", "0 closed, 1 half-open, 2 open", labels=("node",)),
        }
        open_now = GaugeMetricFamily(
            "lb_upstream_connections_open", "Connections open to the node", labels=("node",))
        opened = CounterMetricFamily(
            "lb_upstream_connections_opened_total", "Connections opened to the node",
            labels=("node",))
        retries = CounterMetricFamily(
            "lb_upstream_retries_total", "Requests resent on a fresh connection because a "
            "reused one was dead", labels=("node",))
        for key, node in nodes:
            labels = (key,)
            gauges["inflight"].add_metric(labels, node.inflight)
            gauges["capacity"].add_metric(labels, node.capacity)
            gauges["up"].add_metric(labels, 1 if node.healthy else 0)
            gauges["breaker"].add_metric(labels, BREAKER_STATES[node.breaker.state(now)])
            stats = getattr(node.upstream, "stats", None)  # the h11 pool has them
            if callable(stats):
                pool: dict[str, int] = stats()
                open_now.add_metric(labels, pool["opened"] - pool["closed"])
                opened.add_metric(labels, pool["opened"])
                retries.add_metric(labels, pool["retries"])
        yield from gauges.values()
        yield GaugeMetricFamily(
            "lb_queue_length", "Requests waiting for a free node slot",
            value=registry.slot_freed.statistics().tasks_waiting,
        )
        yield from (open_now, opened, retries)


def _litellm(
    metrics: Metrics, models: list[tuple[str, _ModelStats]],
    routed: list[tuple[str, _ModelStats]],
) -> Iterator[Metric]:
    """The same counts under LiteLLM proxy's names, for dashboards made for it."""
    yield _counter(
        "litellm_proxy_total_requests_metric_total", "Finished requests (as LiteLLM's)",
        ("model", "requested_model", "status_code"),
        _sum_by(metrics.requests, lambda k: (k[0], k[1], str(k[3]))),
    )
    yield _counter(
        "litellm_proxy_failed_requests_metric_total", "Requests that ended in an error (as "
        "LiteLLM's)", ("model", "requested_model", "exception_status"),
        _sum_by(metrics.failures, lambda k: (k[0], k[1], str(k[4]))),
    )
    yield _histogram(
        "litellm_request_total_latency_metric", "Arrival to the end of the answer (as "
        "LiteLLM's)", [(model, stats.duration) for model, stats in models],
    )
    yield _histogram(
        "litellm_llm_api_time_to_first_token_metric", "Streams: time to the first token (as "
        "LiteLLM's)", [(model, stats.ttft) for model, stats in models],
    )
    yield _counter(
        "litellm_total_tokens_metric_total", "Prompt and completion tokens (as LiteLLM's)",
        ("model",), {(model,): stats.prompt + stats.completion for model, stats in routed},
    )
    yield _counter(
        "litellm_input_tokens_metric_total", "Prompt tokens (as LiteLLM's)", ("model",),
        {(model,): stats.prompt for model, stats in routed},
    )
    yield _counter(
        "litellm_output_tokens_metric_total", "Completion tokens (as LiteLLM's)", ("model",),
        {(model,): stats.completion for model, stats in routed},
    )


def _le(bound: float) -> str:
    """A bucket's bound as Prometheus writes it ("0.01", "1.0", "+Inf")."""
    return "+Inf" if bound == math.inf else repr(float(bound))


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # scraped outside trio (tools, tests)
        return 0.0


def _sum_by(
    counts: Mapping[K, int], key: Callable[[K], tuple[str, ...]]
) -> dict[tuple[str, ...], int]:
    """`counts` summed over the labels `key` leaves out."""
    summed: dict[tuple[str, ...], int] = defaultdict(int)
    for labels, value in counts.items():
        summed[key(labels)] += value
    return summed


def _counter(
    name: str, documentation: str, labels: Sequence[str], counts: Mapping[tuple[str, ...], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in sorted(counts.items()):
        family.add_metric(values, count)
    return family


def _histogram(
    name: str, documentation: str, histograms: list[tuple[str, Histogram]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=("model",))
    for model, histogram in histograms:
        if any(histogram.counts):  # e.g. no TTFT for a model only ever asked without streaming
            family.add_metric((model,), histogram.cumulative(), histogram.total)
    return family
