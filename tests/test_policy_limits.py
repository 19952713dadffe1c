"""The pure limit arithmetic: sliding windows, token buckets, a key's counters, budget periods."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.policy.counters import KeyCounters, Limits, Refusal, Ticket
from lb.policy.limits import (
    SlidingWindow,
    TokenBucket,
    add_duration,
    format_reset,
    next_reset,
    parse_duration,
)

gaps = st.lists(
    st.tuples(st.floats(0, 30, allow_nan=False), st.integers(1, 50)), min_size=1, max_size=200
)


def _admitted(limit: int, steps: list[tuple[float, int]], span: float) -> list[tuple[float, int]]:
    window = SlidingWindow(limit, span)
    now, taken = 0.0, list[tuple[float, int]]()
    for gap, weight in steps:
        now += gap
        if window.fits(now, weight):
            window.take(now, weight)
            taken.append((now, weight))
    return taken


@given(st.integers(1, 300), gaps, st.floats(1, 120))
def test_a_window_never_admits_more_than_its_limit_in_any_interval(
    limit: int, steps: list[tuple[float, int]], span: float
) -> None:
    taken = _admitted(limit, steps, span)
    for start, _ in taken:  # every interval (start - span, start] that ends on an admission
        inside = sum(w for at, w in taken if start - span < at <= start)
        assert inside <= limit


@given(st.integers(1, 300), gaps)
def test_a_window_admits_whatever_fits(limit: int, steps: list[tuple[float, int]]) -> None:
    """Never fewer: a request is refused only when the last 60 s plus it exceed the limit."""
    window = SlidingWindow(limit)
    now, taken = 0.0, list[tuple[float, int]]()
    for gap, weight in steps:
        now += gap
        inside = sum(w for at, w in taken if now - 60 < at <= now)
        assert window.fits(now, weight) == (inside + weight <= limit)
        if inside + weight <= limit:
            window.take(now, weight)
            taken.append((now, weight))


@given(st.integers(1, 100), gaps)
def test_retry_after_is_exactly_when_the_request_fits(
    limit: int, steps: list[tuple[float, int]]
) -> None:
    window = SlidingWindow(limit)
    now, taken = 0.0, list[tuple[float, int]]()

    def fits(at: float, weight: int) -> bool:
        return sum(w for t, w in taken if at - 60 < t <= at) + weight <= limit

    for gap, weight in steps:
        now += gap
        if window.fits(now, weight):
            window.take(now, weight)
            taken.append((now, weight))
            continue
        wait = window.retry_after(now, weight)
        if weight > limit:
            assert wait == 60
            continue
        assert wait > 0
        assert fits(now + wait + 1e-9, weight)
        assert not fits(now + wait - 1e-6, weight)


def test_adjust_replaces_an_estimate_while_it_is_in_the_window() -> None:
    window = SlidingWindow(100)
    entry = window.take(0, 10)
    window.adjust(entry, 80, 1)
    assert window.used(1) == 80
    assert not window.fits(1, 21)
    assert window.fits(60.001, 100)  # gone after a minute
    late = window.take(61, 5)
    window.adjust(late, 5, 200)  # long out of the window: nothing to correct
    assert window.used(200) == 0


@given(st.floats(1, 50), st.floats(0.01, 10), gaps)
def test_a_bucket_admits_at_most_capacity_plus_rate_times_the_interval(
    capacity: float, rate: float, steps: list[tuple[float, int]]
) -> None:
    bucket = TokenBucket(capacity, rate)
    now, taken = 0.0, list[float]()
    for gap, _ in steps:
        now += gap
        if bucket.fits(now):
            bucket.take(now)
            taken.append(now)
    for i, start in enumerate(taken):
        for end in taken[i:]:
            count = sum(1 for at in taken if start <= at <= end)
            assert count <= capacity + rate * (end - start) + 1e-9


@given(st.floats(1, 50), st.floats(0.01, 10), st.floats(0, 1000))
def test_a_bucket_refills_at_its_rate_up_to_its_capacity(
    capacity: float, rate: float, idle: float
) -> None:
    bucket = TokenBucket(capacity, rate)
    bucket.take(0, capacity)
    assert bucket.refill(idle) == pytest.approx(min(capacity, rate * idle))


def _counters(limits: Limits) -> KeyCounters:
    counters = KeyCounters()
    counters.configure(limits, 0)
    return counters


@given(st.integers(1, 120), st.integers(1, 20), gaps)
def test_rpm_with_a_burst_keeps_both_limits(
    rpm: int, burst: int, steps: list[tuple[float, int]]
) -> None:
    counters = _counters(Limits(rpm=rpm, burst=burst))
    now, taken = 0.0, list[float]()
    for gap, _ in steps:
        now += gap / 10
        if isinstance(counters.admit(now, 0), Ticket):
            taken.append(now)
    for i, start in enumerate(taken):
        assert sum(1 for at in taken if start - 60 < at <= start) <= rpm
        for end in taken[i:]:
            count = sum(1 for at in taken if start <= at <= end)
            assert count <= burst + rpm / 60 * (end - start) + 1e-9


def test_a_refusal_says_which_limit_and_when_to_retry() -> None:
    counters = _counters(Limits(rpm=2, tpm=100))
    first = counters.admit(0, 10)
    assert isinstance(first, Ticket)
    assert first.figures.remaining_requests == 1 and first.figures.remaining_tokens == 90
    assert isinstance(counters.admit(10, 10), Ticket)
    refused = counters.admit(20, 10)
    assert isinstance(refused, Refusal) and refused.limit == "requests"
    assert refused.retry_after == pytest.approx(40)
    assert refused.figures.remaining_requests == 0
    assert refused.figures.reset_requests == pytest.approx(40)
    tokens = counters.admit(61, 95)  # one request freed; 10 tokens still in the window
    assert isinstance(tokens, Refusal) and tokens.limit == "tokens"
    assert tokens.retry_after == pytest.approx(9)


def test_settling_corrects_tokens_and_frees_the_parallel_slot() -> None:
    counters = _counters(Limits(tpm=1000, parallel=1))
    ticket = counters.admit(0, 10)
    assert isinstance(ticket, Ticket)
    busy = counters.admit(0, 10)
    assert isinstance(busy, Refusal) and busy.limit == "parallel"
    counters.settle(ticket, 900, 1)
    counters.settle(ticket, 900, 1)  # twice is once
    assert counters.inflight == 0
    after = counters.admit(2, 200)
    assert isinstance(after, Refusal) and after.limit == "tokens"
    assert isinstance(counters.admit(2, 100), Ticket)


def test_changed_limits_keep_what_was_counted() -> None:
    counters = _counters(Limits(rpm=10))
    for _ in range(5):
        assert isinstance(counters.admit(0, 0), Ticket)
    counters.configure(Limits(rpm=5), 1)
    assert isinstance(counters.admit(1, 0), Refusal)


@given(st.integers(1, 1000))
def test_a_share_never_adds_up_to_more_than_the_limit(limit: int) -> None:
    for parts in range(1, 6):
        share = Limits(rpm=limit).share(parts)
        assert share.rpm is not None
        assert share.rpm * parts <= max(limit, parts)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("30s", (30, "s")), ("10m", (10, "m")), ("24h", (24, "h")), ("30d", (30, "d")),
     ("1w", (1, "w")), ("1mo", (1, "mo")), (" 2mo ", (2, "mo"))],
)
def test_durations(text: str, parsed: tuple[int, str]) -> None:
    assert parse_duration(text) == parsed


@pytest.mark.parametrize("text", ["", "0d", "1y", "d", "-1d", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_months_are_calendar_months() -> None:
    jan31 = datetime(2026, 1, 31, 12, tzinfo=UTC).timestamp()
    feb = datetime.fromtimestamp(add_duration(jan31, (1, "mo")), UTC)
    assert (feb.month, feb.day) == (2, 28)
    dec = datetime(2026, 12, 5, tzinfo=UTC).timestamp()
    assert datetime.fromtimestamp(add_duration(dec, (1, "mo")), UTC).year == 2027
    assert add_duration(0, (2, "d")) == 2 * 86400


@given(st.floats(0, 1e6), st.integers(1, 100), st.sampled_from(["s", "m", "h", "d"]))
def test_next_reset_is_the_first_period_end_after_now(
    now: float, count: int, unit: str
) -> None:
    end = next_reset(0, (count, unit), now)
    step = add_duration(0, (count, unit))
    assert now < end <= now + step


def test_reset_header_format() -> None:
    assert format_reset(1) == "1s"
    assert format_reset(0.5) == "0.5s"
    assert format_reset(360) == "6m0s"
    assert format_reset(61.25) == "1m1.25s"
    assert format_reset(12.3456) == "12.3s"
    assert format_reset(-3) == "0s"
