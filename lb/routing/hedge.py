"""Hedged requests: when to start a second attempt on another node (HEDGE_AFTER_MS).

An attempt that has sent no first byte after the hedge delay gets a twin on a different node
with a free slot; the first of them whose answer head (stream or not) arrives wins, and the
others are cancelled (dispatch runs that race: `_Run._race`). This module owns the delay:

- a number: that many milliseconds after the attempt started;
- ``adaptive``: the model's recent p95 time to the answer's head (the winners' times from
  attempt start, over the last `WINDOW_SECS`), never under `MIN_DELAY`; with fewer than
  `MIN_SAMPLES` figures nothing is hedged (lb does not know yet what "slow" is).

`delay_for` is pure; `Hedger` keeps the per-model windows (only for ``adaptive``) and caches
each p95 for a second, so a request pays a dict lookup, not a sort.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final, Literal

import attrs

from lb.obs.stats import Window

ADAPTIVE: Final = "adaptive"
HedgeAfter = float | Literal["adaptive"] | None  # milliseconds, adaptive, or None: off

MIN_SAMPLES = 20
MIN_DELAY = 0.005  # seconds: below this a hedge would double nearly every request
WINDOW_SECS = 300.0
WINDOW_SIZE = 256
REFRESH_SECS = 1.0  # how long a model's p95 is reused before it is computed again
MAX_MODELS = 1024


def parse_hedge_after(value: Any) -> HedgeAfter:
    """`HEDGE_AFTER_MS`: empty or 0 -> off (None), ``adaptive``, or milliseconds > 0."""
    if value is None or isinstance(value, bool):
        raise ValueError("expected milliseconds, 'adaptive', or 0 / empty for off")
    text = str(value).strip().lower()
    if text in ("", "0", "off"):
        return None
    if text == ADAPTIVE:
        return ADAPTIVE
    try:
        number = float(text)
    except ValueError:
        raise ValueError("expected milliseconds, 'adaptive', or 0 / empty for off") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be a finite number of milliseconds >= 0, or 'adaptive'")
    return number or None


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile of a non-empty sequence (always one of its values)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(0.95 * len(ordered))) - 1]


def delay_for(after: HedgeAfter, recent: Sequence[float]) -> float | None:
    """Seconds after an attempt's start at which it is hedged, or None for no hedge.
    `recent`: the model's recent times to the answer's head, in seconds (read for adaptive)."""
    if after is None:
        return None
    if after == ADAPTIVE:
        if len(recent) < MIN_SAMPLES:
            return None
        return max(MIN_DELAY, p95(recent))
    return float(after) / 1000


@attrs.define(eq=False)
class Hedger:
    """The hedge delay per model, and the figures `adaptive` reads."""

    after: HedgeAfter
    max_hedges: int = 1
    _windows: dict[str, Window] = attrs.field(init=False, factory=dict)
    _cached: dict[str, tuple[float, float | None]] = attrs.field(init=False, factory=dict)

    @property
    def adaptive(self) -> bool:
        return self.after == ADAPTIVE

    def delay(self, model: str, now: float) -> float | None:
        if not self.adaptive:
            return delay_for(self.after, ())
        cached = self._cached.get(model)
        if cached is not None and now - cached[0] < REFRESH_SECS:
            return cached[1]
        window = self._windows.get(model)
        value = delay_for(self.after, window.values(now) if window is not None else ())
        self._cached[model] = (now, value)
        return value

    def observe(self, model: str, now: float, seconds: float) -> None:
        """An attempt's answer head came `seconds` after it started (adaptive only)."""
        if not self.adaptive:
            return
        window = self._windows.get(model)
        if window is None:
            if len(self._windows) >= MAX_MODELS:  # the oldest model makes room
                oldest = next(iter(self._windows))
                del self._windows[oldest]
                self._cached.pop(oldest, None)
            window = self._windows[model] = Window(WINDOW_SECS, WINDOW_SIZE)
        window.add(now, seconds)
