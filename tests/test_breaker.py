"""Circuit breaker: example walkthroughs plus a stateful test against a reference model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lb.cluster.breaker import BreakerState, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def tripped(threshold: int = 3, ttl: float = 30.0, at: float = 100.0) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold=threshold, ttl=ttl)
    for _ in range(threshold):
        breaker.record_failure(at)
    return breaker


def test_defaults() -> None:
    breaker = CircuitBreaker()
    assert (breaker.threshold, breaker.ttl) == (3, 30.0)
    assert breaker.state(0.0) is CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.open_until() is None


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker = CircuitBreaker(threshold=3, ttl=30.0)
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    assert breaker.state(2.0) is CLOSED
    assert breaker.acquire(2.0)
    breaker.record_failure(3.0)
    assert breaker.consecutive_failures == 3
    assert breaker.state(3.0) is OPEN
    assert not breaker.allows(3.0)
    assert not breaker.acquire(3.0)
    assert breaker.open_until() == 33.0


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(threshold=3)
    for _ in range(5):
        breaker.record_failure(0.0)
        breaker.record_failure(0.0)
        breaker.record_success(0.0)
        assert breaker.consecutive_failures == 0
    assert breaker.state(0.0) is CLOSED


def test_half_open_after_ttl_then_success_closes() -> None:
    breaker = tripped(at=100.0)
    assert breaker.state(129.999) is OPEN
    assert breaker.state(130.0) is HALF_OPEN
    assert breaker.allows(130.0)
    assert breaker.acquire(130.0)
    breaker.record_success(131.0)
    assert breaker.state(131.0) is CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.acquire(131.0) and breaker.acquire(131.0)


def test_half_open_probe_failure_reopens_for_another_ttl() -> None:
    breaker = tripped(at=100.0)
    assert breaker.acquire(140.0)
    breaker.record_failure(145.0)
    assert breaker.state(145.0) is OPEN
    assert not breaker.allows(174.9)
    assert breaker.state(175.0) is HALF_OPEN
    assert breaker.acquire(175.0)


def test_half_open_admits_exactly_one_probe() -> None:
    breaker = tripped(at=0.0)
    assert breaker.acquire(30.0)
    assert breaker.probe_inflight
    assert not breaker.allows(30.0)
    for t in (30.0, 31.0, 1000.0):
        assert not breaker.acquire(t)
    assert breaker.state(1000.0) is HALF_OPEN


def test_release_probe_lets_another_probe_in() -> None:
    breaker = tripped(at=0.0)
    assert breaker.acquire(30.0)
    breaker.release_probe()
    assert breaker.state(31.0) is HALF_OPEN
    assert breaker.allows(31.0)
    assert breaker.acquire(31.0)
    assert not breaker.acquire(31.0)


def test_allows_has_no_side_effect() -> None:
    breaker = tripped(at=0.0)
    for _ in range(5):
        assert breaker.allows(30.0)
    assert breaker.acquire(30.0)


def test_late_failure_while_open_does_not_extend_it() -> None:
    breaker = tripped(at=0.0)
    breaker.record_failure(20.0)  # a request admitted before the trip fails late
    assert breaker.consecutive_failures == 4
    assert breaker.state(30.0) is HALF_OPEN


def test_disabled_breaker_never_opens() -> None:
    breaker = CircuitBreaker(threshold=0, ttl=30.0)
    for i in range(100):
        breaker.record_failure(float(i))
        assert breaker.state(float(i)) is CLOSED
        assert breaker.acquire(float(i))
    assert breaker.consecutive_failures == 100


def test_disabling_an_open_breaker_closes_it() -> None:
    breaker = tripped(at=0.0)
    breaker.threshold = 0
    assert breaker.state(1.0) is CLOSED
    assert breaker.acquire(1.0)


def test_zero_ttl_goes_straight_to_half_open() -> None:
    breaker = tripped(ttl=0.0, at=5.0)
    assert breaker.state(5.0) is HALF_OPEN
    assert breaker.acquire(5.0)
    assert not breaker.acquire(5.0)


def test_rejects_negative_ttl() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(ttl=-1.0)


# ------------------------------------------------------------------------- stateful model


class BreakerMachine(RuleBasedStateMachine):
    """Drive a breaker with random events and compare it with a from-the-spec model.

    The model keeps an event log view of the spec: the breaker is open from the moment the
    threshold-th consecutive failure (or a failure in half-open) happened, until a success;
    half-open once ttl has elapsed since then; one probe at a time while half-open.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.breaker = CircuitBreaker()
        self.failures = 0
        self.tripped_at: float | None = None
        self.probe = False
        self.admitted_in_half_open = 0

    @initialize(threshold=st.integers(0, 4), ttl=st.sampled_from([0.0, 1.0, 5.0, 30.0]))
    def setup(self, threshold: int, ttl: float) -> None:
        self.breaker = CircuitBreaker(threshold=threshold, ttl=ttl)

    def expected_state(self) -> BreakerState:
        if self.tripped_at is None:
            return CLOSED
        if self.now >= self.tripped_at + self.breaker.ttl:
            return HALF_OPEN
        return OPEN

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 4.0, 30.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def allows(self) -> None:
        expected = {CLOSED: True, OPEN: False, HALF_OPEN: not self.probe}[self.expected_state()]
        assert self.breaker.allows(self.now) is expected

    @rule()
    def acquire(self) -> None:
        state = self.expected_state()
        expected = {CLOSED: True, OPEN: False, HALF_OPEN: not self.probe}[state]
        assert self.breaker.acquire(self.now) is expected
        if state is HALF_OPEN and expected:
            self.probe = True
            self.admitted_in_half_open += 1

    @rule()
    def success(self) -> None:
        self.breaker.record_success(self.now)
        self.failures = 0
        self.tripped_at = None
        self.probe = False
        self.admitted_in_half_open = 0

    @rule()
    def failure(self) -> None:
        state = self.expected_state()
        self.breaker.record_failure(self.now)
        self.failures += 1
        if self.breaker.threshold <= 0:
            return
        if state is HALF_OPEN or (state is CLOSED and self.failures >= self.breaker.threshold):
            self.tripped_at = self.now
            self.probe = False
            self.admitted_in_half_open = 0

    @precondition(lambda self: self.probe)
    @rule()
    def release(self) -> None:
        self.breaker.release_probe()
        self.probe = False
        self.admitted_in_half_open -= 1

    @invariant()
    def state_matches_model(self) -> None:
        assert self.breaker.state(self.now) is self.expected_state()
        assert self.breaker.consecutive_failures == self.failures
        assert self.breaker.probe_inflight is self.probe

    @invariant()
    def at_most_one_probe_outstanding(self) -> None:
        assert self.admitted_in_half_open <= 1

    @invariant()
    def open_never_admits(self) -> None:
        if self.breaker.state(self.now) is OPEN:
            assert not self.breaker.allows(self.now)

    @invariant()
    def disabled_is_always_closed(self) -> None:
        if self.breaker.threshold <= 0:
            assert self.breaker.state(self.now) is CLOSED


BreakerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_breaker_matches_model = BreakerMachine.TestCase
