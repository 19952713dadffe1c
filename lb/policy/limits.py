"""The arithmetic of limits, pure (time is passed in): sliding windows, token buckets, budget
periods and the figures of OpenAI's rate-limit headers.

Semantics (the README says the same):
- A per-minute limit L (requests or tokens) is a *sliding* window: the weights admitted in any
  60-second interval never add up to more than L. A request is admitted when what the window
  holds plus its own weight fits; what it frees comes back exactly 60 s after it was taken.
- A burst B (optional, requests only) is a token bucket of B tokens refilled at L/60 per
  second, taken on top of the window: at most B requests at once, then one every 60/L s, and
  still never more than L in any minute. Without B a key may spend its whole minute at once.
- Tokens: the prompt estimate is taken when the request is admitted and replaced by the real
  usage (prompt + completion) when it ends, so the window may run over L after a long answer;
  new requests then wait until it is back under.
"""

from __future__ import annotations

import calendar
import math
import re
from collections import deque
from datetime import UTC, datetime

import attrs

WINDOW = 60.0  # seconds: RPM and TPM


class SlidingWindow:
    """At most `limit` weight in any `span`-second interval (exact: one entry per admission).

    Entries are two deques of floats (times, weights), not objects: a window may hold a
    minute of requests, and objects that many would cost every garbage collection."""

    __slots__ = ("limit", "popped", "span", "times", "total", "weights")

    def __init__(self, limit: float, span: float = WINDOW) -> None:
        self.limit = limit
        self.span = span
        self.times: deque[float] = deque()
        self.weights: deque[float] = deque()
        self.total = 0.0
        self.popped = 0  # entries expired so far: an entry's handle minus this is its index

    def _expire(self, now: float) -> None:
        horizon = now - self.span
        times = self.times
        if not times or times[0] > horizon:
            return
        weights = self.weights
        while times and times[0] <= horizon:
            times.popleft()
            self.total -= weights.popleft()
            self.popped += 1
        if not times:
            self.total = 0.0  # no float drift survives an empty window

    def used(self, now: float) -> float:
        self._expire(now)
        return self.total

    def fits(self, now: float, weight: float) -> bool:
        self._expire(now)
        return self.total + weight <= self.limit

    def take(self, now: float, weight: float) -> int:
        """Record an admission (check `fits` first); returns its handle for `adjust`."""
        self.times.append(now)
        self.weights.append(weight)
        self.total += weight
        return self.popped + len(self.times) - 1

    def adjust(self, handle: int, weight: float, now: float) -> None:
        """Replace an admission's weight with the real figure, if it is still in the window."""
        self._expire(now)
        index = handle - self.popped
        if 0 <= index < len(self.times):
            self.total += weight - self.weights[index]
            self.weights[index] = weight

    def retry_after(self, now: float, weight: float) -> float:
        """Seconds until `weight` fits (the span itself if it never can)."""
        self._expire(now)
        if weight > self.limit:
            return self.span
        excess = self.total + weight - self.limit
        if excess <= 0:
            return 0.0
        for at, taken in zip(self.times, self.weights, strict=True):
            excess -= taken
            if excess <= 0:
                return at + self.span - now
        return self.span

    def reset_in(self, now: float) -> float:
        """Seconds until the window frees its oldest admission (0 when empty)."""
        self._expire(now)
        return self.times[0] + self.span - now if self.times else 0.0


@attrs.define(slots=True, eq=False)
class TokenBucket:
    """`capacity` tokens, refilled continuously at `rate` per second; starts full."""

    capacity: float
    rate: float
    level: float = attrs.field()
    last: float = 0.0

    @level.default
    def _full(self) -> float:
        return self.capacity

    def refill(self, now: float) -> float:
        if now > self.last:
            self.level = min(self.capacity, self.level + (now - self.last) * self.rate)
            self.last = now
        return self.level

    def fits(self, now: float, weight: float = 1.0) -> bool:
        return self.refill(now) >= weight

    def take(self, now: float, weight: float = 1.0) -> None:
        self.refill(now)
        self.level -= weight

    def retry_after(self, now: float, weight: float = 1.0) -> float:
        missing = weight - self.refill(now)
        if missing <= 0:
            return 0.0
        return missing / self.rate if self.rate > 0 else math.inf


# --- budget periods ----------------------------------------------------------------------

_DURATION = re.compile(r"\s*(\d+)\s*(mo|s|m|h|d|w)\s*")
_UNIT_SECS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> tuple[int, str]:
    """LiteLLM's `budget_duration`: `30s`, `10m`, `24h`, `30d`, `1w`, `1mo` -> (n, unit)."""
    match = _DURATION.fullmatch(text)
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(
            f"{text!r} is not a duration: a whole number > 0 and s, m, h, d, w or mo"
        )
    return int(match.group(1)), match.group(2)


def add_duration(start: float, duration: tuple[int, str]) -> float:
    """`start` (Unix seconds) plus the duration; months are calendar months, UTC, the day
    clamped to the month's last (31 Jan + 1mo = 28/29 Feb)."""
    count, unit = duration
    if unit != "mo":
        return start + count * _UNIT_SECS[unit]
    when = datetime.fromtimestamp(start, UTC)
    months = when.month - 1 + count
    year, month = when.year + months // 12, months % 12 + 1
    day = min(when.day, calendar.monthrange(year, month)[1])
    return when.replace(year=year, month=month, day=day).timestamp()


def next_reset(reset_at: float, duration: tuple[int, str], now: float) -> float:
    """The first period end after `now`, counting whole periods from `reset_at`."""
    count, unit = duration
    if unit != "mo" and reset_at <= now:  # skip the whole periods at once
        step = count * _UNIT_SECS[unit]
        reset_at += (math.floor((now - reset_at) / step) + 1) * step
    while reset_at <= now:  # months (or float rounding): one period at a time
        reset_at = add_duration(reset_at, duration)
    return reset_at


def format_reset(seconds: float) -> str:
    """OpenAI's `x-ratelimit-reset-*` form: `1s`, `6m0s`, `0.5s` (3 significant digits)."""
    if seconds < 60:
        return f"{max(0.0, seconds):.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3g}s"
