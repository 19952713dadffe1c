"""Statistics of a bench run, pure: percentiles, summaries, paired differences, CDFs and
per-second series. No I/O, no clock: the runner hands in plain numbers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import attrs

QUANTILES: tuple[tuple[str, float], ...] = (
    ("p50", 0.50), ("p90", 0.90), ("p95", 0.95), ("p99", 0.99),
)


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of ascending `ordered`, interpolated linearly between the
    two nearest ranks (numpy's default); NaN for no values."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    frac = pos - low
    if frac == 0.0:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * frac


@attrs.frozen
class Summary:
    count: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    min: float

    def as_dict(self) -> dict[str, float | int]:
        return attrs.asdict(self)


def summarize(values: Iterable[float]) -> Summary:
    """Count, mean, p50/p90/p95/p99, max and min (NaN for everything but count when empty)."""
    ordered = sorted(values)
    if not ordered:
        nan = math.nan
        return Summary(0, nan, nan, nan, nan, nan, nan, nan)
    return Summary(
        count=len(ordered),
        mean=math.fsum(ordered) / len(ordered),
        p50=percentile(ordered, 0.50),
        p90=percentile(ordered, 0.90),
        p95=percentile(ordered, 0.95),
        p99=percentile(ordered, 0.99),
        max=ordered[-1],
        min=ordered[0],
    )


def paired_differences(
    pairs: Iterable[tuple[float | None, float | None]],
) -> list[float]:
    """`a - b` for each (a, b) pair where both sides succeeded (None: that side failed).

    Added latency must be the percentile of these per-pair differences, never the difference
    of two percentiles: the two distributions' tails need not come from the same requests."""
    return [a - b for a, b in pairs if a is not None and b is not None]


def cdf(values: Iterable[float], points: int = 200) -> list[tuple[float, float]]:
    """(value, fraction of values <= it) at up to `points` evenly spaced ranks, ends included:
    enough for a plot, whatever the sample size."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return []
    step = max(1, n // points)
    ranks = [*range(0, n, step)]
    if ranks[-1] != n - 1:
        ranks.append(n - 1)
    return [(ordered[i], (i + 1) / n) for i in ranks]


def per_second(times: Iterable[float], weights: Iterable[float] | None = None,
               *, bucket: float = 1.0) -> list[float]:
    """Sum of `weights` (1 each by default) per `bucket`-second slot of `times` (seconds from
    the run's start, >= 0), divided by the bucket: a rate series for throughput plots."""
    if bucket <= 0:
        raise ValueError("bucket must be > 0")
    ts = list(times)
    ws = [1.0] * len(ts) if weights is None else list(weights)
    if len(ws) != len(ts):
        raise ValueError("times and weights differ in length")
    if not ts:
        return []
    slots = [0.0] * (int(max(ts) // bucket) + 1)
    for t, w in zip(ts, ws, strict=True):
        slots[int(t // bucket)] += w
    return [s / bucket for s in slots]
