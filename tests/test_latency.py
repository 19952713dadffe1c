"""Latency figures per node: the EWMA, decay by age, and the observer that keeps them."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.obs.latency import HALF_LIFE, STALE_AFTER, LatencyTracker, decayed, ewma
from lb.obs.observer import Outcome, Trace

FAST = settings(max_examples=100, deadline=None)
seconds = st.floats(0.0, 1000.0, allow_nan=False)
ages = st.floats(0.0, 2 * STALE_AFTER, allow_nan=False)
figure_sets = st.dictionaries(st.text(max_size=6), st.tuples(seconds, ages), max_size=8)


@FAST
@given(st.none() | seconds, seconds)
def test_ewma_moves_toward_each_observation(previous: float | None, value: float) -> None:
    got = ewma(previous, value)
    if previous is None:
        assert got == value
    else:
        assert min(previous, value) <= got <= max(previous, value)


@FAST
@given(figure_sets)
def test_decay_keeps_fresh_figures_within_their_range(
    figures: dict[str, tuple[float, float]]
) -> None:
    got = decayed(figures)
    fresh = {key: value for key, (value, age) in figures.items() if age <= STALE_AFTER}
    assert set(got) == set(fresh)  # stale ones are unknown again
    if fresh:
        low, high = min(fresh.values()), max(fresh.values())
        for value in got.values():
            assert low - 1e-9 <= value <= high + 1e-9


@FAST
@given(figure_sets, st.text(max_size=6), seconds, st.floats(0.0, STALE_AFTER / 2))
def test_an_older_figure_is_nearer_the_mean(
    figures: dict[str, tuple[float, float]], key: str, value: float, age: float
) -> None:
    figures = {**figures, key: (value, age)}
    older = {**figures, key: (value, age + HALF_LIFE)}
    young, old = decayed(figures), decayed(older)
    fresh = [v for v, a in figures.values() if a <= STALE_AFTER]
    mean = math.fsum(fresh) / len(fresh)
    assert abs(old[key] - mean) <= abs(young[key] - mean) + 1e-9


def test_decay_halves_the_distance_to_the_mean_every_half_life() -> None:
    got = decayed({"fast": (0.1, HALF_LIFE), "slow": (0.5, 0.0)})
    # mean 0.3; fast is one half-life old: 0.3 - 0.2 / 2
    assert got == {"fast": pytest.approx(0.2), "slow": pytest.approx(0.5)}
    assert decayed({"a": (1.0, STALE_AFTER + 1)}) == {}


def _trace(arrival: float, first_byte: float | None = None) -> Trace:
    trace = Trace("r", "chat", first_byte is not None, "m", arrival)
    trace.first_byte = first_byte
    return trace


async def test_tracker_records_successes_once_active() -> None:
    tracker = LatencyTracker()
    tracker.attempt_finished(_trace(0.0), "a:1", Outcome.SUCCESS, 200, 0.5)
    assert tracker.figures(["a:1"]) == {}  # not recording before a strategy asked
    assert tracker.active
    start = trio.current_time()
    tracker.attempt_finished(_trace(start), "a:1", Outcome.SUCCESS, 200, 0.5)
    tracker.attempt_finished(_trace(start), "b:1", Outcome.FAILURE, 502, 0.01)
    tracker.attempt_finished(_trace(start), "c:1", Outcome.BUSY, 429, 0.01)
    tracker.attempt_finished(_trace(start), "d:1", Outcome.NO_VERDICT, None, 0.01)
    assert tracker.figures(["a:1", "b:1", "c:1", "d:1", "e:1"]) == {"a:1": 0.5}
    tracker.attempt_finished(_trace(start), "a:1", Outcome.SUCCESS, 200, 1.5)
    assert tracker.figures(["a:1"]) == {"a:1": pytest.approx(0.5 + 0.3 * 1.0)}


async def test_tracker_ttft_of_a_stream_is_its_first_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = LatencyTracker(active=True)
    arrival = trio.current_time()
    await trio.sleep(3.0)  # autojump clock: the request arrived 3 s ago
    # The attempt took the last 2 s; its first byte went out 1.5 s after arrival (0.5 s in).
    tracker.attempt_finished(_trace(arrival, first_byte=1.5), "a:1", Outcome.SUCCESS, 200, 2.0)
    assert tracker.figures(["a:1"]) == {"a:1": pytest.approx(0.5)}
    assert tracker.figures(["a:1"], "attempt") == {"a:1": pytest.approx(2.0)}


async def test_tracker_figures_go_stale(autojump_clock: trio.testing.MockClock) -> None:
    tracker = LatencyTracker(active=True)
    now = trio.current_time()
    tracker.attempt_finished(_trace(now), "a:1", Outcome.SUCCESS, 200, 0.1)
    await trio.sleep(STALE_AFTER / 2)
    tracker.attempt_finished(_trace(now), "b:1", Outcome.SUCCESS, 200, 0.5)
    got = tracker.figures(["a:1", "b:1"])
    assert got["b:1"] == pytest.approx(0.5) and 0.1 < got["a:1"] < 0.3  # drifting to the mean
    await trio.sleep(STALE_AFTER / 2 + 1)
    assert set(tracker.figures(["a:1", "b:1"])) == {"b:1"}  # a:1 is unknown again


async def test_tracker_memory_is_bounded() -> None:
    tracker = LatencyTracker(active=True, max_keys=3)
    for i in range(10):
        tracker.attempt_finished(_trace(0.0), f"n{i}:1", Outcome.SUCCESS, 200, 0.1)
    assert list(tracker.nodes) == ["n7:1", "n8:1", "n9:1"]
