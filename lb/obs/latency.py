"""Recent latency per node for the strategies that read it (LATENCY_OPTIMIZED, LOAD_BALANCED),
kept by a `RequestObserver`.

Per node two exponentially weighted moving averages (EWMA, each new observation weighing
`ALPHA`), of successful attempts only (a timeout says how long lb waited, not how fast the
node answers):

- ``attempt``: the attempt's whole duration;
- ``ttft``: time to first byte of the attempt: for a stream, from the attempt's start to its
  first byte to the client; for a whole answer, the attempt's duration (lb sends it at once).

Figures age: `decayed` pulls a figure toward the mean of the fresh ones as it gets older (its
distance from that mean halves every `HALF_LIFE` seconds), and drops it once it is `STALE_AFTER`
seconds old: the node is unknown again, and the strategies explore it. So a node that was slow
a while ago gets tried again, and one that was fast does not keep its lead on old evidence.

Each event costs O(1); reading costs O(candidates) and happens only for those strategies.
Until a strategy first reads figures (`active`), events cost one test: a lb whose strategy
never needs them pays next to nothing.
Memory is bounded by `max_keys` nodes (the least recently updated makes room).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import attrs
import trio

from lb.obs.observer import Observer, Outcome, Trace

ALPHA = 0.3
HALF_LIFE = 30.0
STALE_AFTER = 300.0
MAX_KEYS = 1024


def ewma(previous: float | None, value: float, alpha: float = ALPHA) -> float:
    """The moving average after one more observation (the first one is taken as is)."""
    return value if previous is None else previous + alpha * (value - previous)


def decayed(
    figures: Mapping[str, tuple[float, float]], half_life: float = HALF_LIFE,
    stale_after: float = STALE_AFTER,
) -> dict[str, float]:
    """``{key: (value, age in seconds)}`` -> ``{key: value}`` as strategies should see it: each
    value pulled toward the mean of the fresh ones by ``2 ** (-age / half_life)``, and those
    older than ``stale_after`` left out (unknown)."""
    fresh = {key: item for key, item in figures.items() if item[1] <= stale_after}
    if not fresh:
        return {}
    mean = math.fsum(value for value, _ in fresh.values()) / len(fresh)
    return {
        key: mean + (value - mean) * 2.0 ** (-max(age, 0.0) / half_life)
        for key, (value, age) in fresh.items()
    }


@attrs.define(slots=True, eq=False)
class _Figures:
    attempt: float | None = None
    ttft: float | None = None
    updated: float = 0.0


@attrs.define(eq=False)
class LatencyTracker(Observer):
    """The observer, and what dispatch asks for figures. `clock`: the trio clock by default."""

    clock: Callable[[], float] = trio.current_time
    half_life: float = HALF_LIFE
    stale_after: float = STALE_AFTER
    max_keys: int = MAX_KEYS
    active: bool = False  # record events: set by the first `figures` call
    nodes: dict[str, _Figures] = attrs.field(factory=dict)

    def attempt_finished(
        self, trace: Trace, node: str, outcome: Outcome, status: int | None, seconds: float
    ) -> None:
        if outcome is not Outcome.SUCCESS or not self.active:
            return
        now = self.clock()
        ttft = seconds
        if trace.first_byte is not None:  # a stream: its first byte went out in this attempt
            started = now - seconds - trace.arrival
            ttft = min(seconds, max(0.0, trace.first_byte - started))
        figures = self.nodes.pop(node, None)  # re-inserted: the dict stays in update order
        if figures is None:
            figures = _Figures()
            if len(self.nodes) >= self.max_keys:
                del self.nodes[next(iter(self.nodes))]
        figures.attempt = ewma(figures.attempt, seconds)
        figures.ttft = ewma(figures.ttft, ttft)
        figures.updated = now
        self.nodes[node] = figures

    def figures(
        self, keys: Iterable[str], measure: str = "ttft", *, start: bool = True
    ) -> dict[str, float]:
        """Recent seconds per node of ``keys`` that has a fresh figure (see `decayed`);
        ``measure``: ``ttft`` or ``attempt``. The first call starts the recording, unless
        ``start`` is false (an explanation only reads)."""
        if start:
            self.active = True
        now = self.clock()
        raw: dict[str, tuple[float, float]] = {}
        for key in keys:
            figures = self.nodes.get(key)
            if figures is None:
                continue
            value = figures.ttft if measure == "ttft" else figures.attempt
            if value is not None:
                raw[key] = (value, now - figures.updated)
        return decayed(raw, self.half_life, self.stale_after)
