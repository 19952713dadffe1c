"""Routing stats for `GET /api/routing/stats`: per node and per model, counts since start and
latencies over a recent window, kept by a `RequestObserver`.

Per node, every attempt counts: `requests` are attempts sent to it, `failures` those that ended
with `Outcome.FAILURE` (the node's own fault), and the latency is the attempts' own durations
(successful attempts only: a timeout says how long lb waited, not how fast the node answers).

Per model, every request routed to it counts (one whose model was resolved; a request refused
before, e.g. an unknown model, has no model to count against): `failures` are the requests
whose client got an error from lb (all nodes failed, busy or full, the deadline passed, a
stream broke), not those that left early nor a node's own 4xx answer. The latency is the whole
request's (`Trace.duration`, successful requests only) and the TTFT a stream's first byte
(`Trace.first_byte`, whenever one went out).

Each event costs O(1): counters, and an append to a ring of the last `size` observations per
node or model. Observations older than the window are dropped when the stats are read, which
sorts what is left (at most `size` values per ring). Memory is bounded: `size` observations
per ring and at most `max_keys` nodes and models (the oldest entry makes room).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import TypedDict

import attrs
import trio

from lb.obs.observer import Observer, Outcome, Trace

WINDOW_SECS = 300.0
WINDOW_SIZE = 1024  # observations kept per node or model (and per measure)
MAX_KEYS = 1024  # nodes or models tracked (each ring is at most WINDOW_SIZE entries)


class Summary(TypedDict):
    """A window's average and percentiles in milliseconds (None when it is empty)."""

    avg: float | None
    p50: float | None
    p95: float | None
    samples: int


class Tokens(TypedDict):
    prompt: int
    completion: int


class NodeView(TypedDict):
    requests: int
    failures: int
    success_rate: float | None
    latency_ms: Summary
    tokens: Tokens


class ModelView(NodeView):
    ttft_ms: Summary


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list (always one of its values)."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@attrs.define(slots=True, eq=False)
class Window:
    """The last `size` observations as (time, value); those older than `span` seconds are
    dropped when read. Times must not go backwards (a monotonic clock)."""

    span: float
    size: int
    _items: deque[tuple[float, float]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._items = deque(maxlen=self.size)

    def add(self, now: float, value: float) -> None:
        self._items.append((now, value))

    def __len__(self) -> int:
        return len(self._items)

    def values(self, now: float) -> list[float]:
        """The observations of the last `span` seconds, oldest first."""
        items = self._items
        cutoff = now - self.span
        while items and items[0][0] < cutoff:
            items.popleft()
        return [value for _, value in items]

    def summary_ms(self, now: float) -> Summary:
        """Average, p50 and p95 in milliseconds (None when the window is empty) and how many
        observations they come from."""
        values = self.values(now)
        if not values:
            return {"avg": None, "p50": None, "p95": None, "samples": 0}
        ordered = sorted(values)
        return {
            "avg": _ms(math.fsum(ordered) / len(ordered)),
            "p50": _ms(_percentile(ordered, 0.50)),
            "p95": _ms(_percentile(ordered, 0.95)),
            "samples": len(ordered),
        }


@attrs.define(slots=True, eq=False)
class Series:
    """What is known of one node or one model."""

    latency: Window
    ttft: Window
    requests: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add_tokens(self, trace: Trace) -> None:
        if trace.prompt_tokens:
            self.prompt_tokens += trace.prompt_tokens
        if trace.completion_tokens:
            self.completion_tokens += trace.completion_tokens


def _success_rate(requests: int, failures: int) -> float | None:
    return None if not requests else round((requests - failures) / requests, 4)


@attrs.define(eq=False)
class RoutingStats(Observer):
    """The observer. `clock` gives the time observations are stamped and read with."""

    clock: Callable[[], float] = trio.current_time
    window: float = WINDOW_SECS
    size: int = WINDOW_SIZE
    max_keys: int = MAX_KEYS
    nodes: dict[str, Series] = attrs.field(factory=dict)
    models: dict[str, Series] = attrs.field(factory=dict)

    def _series(self, table: dict[str, Series], key: str) -> Series:
        series = table.get(key)
        if series is None:
            if len(table) >= self.max_keys:
                del table[next(iter(table))]  # the oldest entry makes room
            series = table[key] = Series(
                Window(self.window, self.size), Window(self.window, self.size)
            )
        return series

    # --- RequestObserver --------------------------------------------------------------------

    def attempt_finished(
        self, trace: Trace, node: str, outcome: Outcome, status: int | None, seconds: float
    ) -> None:
        series = self._series(self.nodes, node)
        series.requests += 1
        if outcome is Outcome.FAILURE:
            series.failures += 1
        elif outcome is Outcome.SUCCESS:
            series.latency.add(self.clock(), seconds)

    def finished(self, trace: Trace) -> None:
        model = trace.model
        if model is None:  # refused before it was routed
            return
        now = self.clock()
        series = self._series(self.models, model)
        series.requests += 1
        if trace.error is not None and not trace.client_gone:
            series.failures += 1
        elif not trace.client_gone:
            series.latency.add(now, trace.duration)
        if trace.stream and trace.first_byte is not None:
            series.ttft.add(now, trace.first_byte)
        if trace.prompt_tokens or trace.completion_tokens:
            series.add_tokens(trace)
            if trace.node is not None:
                self._series(self.nodes, trace.node).add_tokens(trace)

    # --- views ------------------------------------------------------------------------------

    def _empty(self) -> Series:
        return Series(Window(self.window, 1), Window(self.window, 1))

    def node_view(self, key: str) -> NodeView:
        """A node's counts, latency (ms) and tokens."""
        series = self.nodes.get(key) or self._empty()
        return {
            "requests": series.requests,
            "failures": series.failures,
            "success_rate": _success_rate(series.requests, series.failures),
            "latency_ms": series.latency.summary_ms(self.clock()),
            "tokens": {"prompt": series.prompt_tokens, "completion": series.completion_tokens},
        }

    def model_view(self, model: str) -> ModelView:
        """A model's counts, latency and TTFT (ms) and tokens."""
        series = self.models.get(model) or self._empty()
        now = self.clock()
        return {
            "requests": series.requests,
            "failures": series.failures,
            "success_rate": _success_rate(series.requests, series.failures),
            "latency_ms": series.latency.summary_ms(now),
            "ttft_ms": series.ttft.summary_ms(now),
            "tokens": {"prompt": series.prompt_tokens, "completion": series.completion_tokens},
        }
