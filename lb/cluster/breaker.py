"""Per-node circuit breaker: stop sending traffic to a node that keeps failing.

``threshold`` consecutive failures open the breaker for ``ttl`` seconds; after that it is
half-open and admits exactly one probe request, whose success closes it and whose failure
re-opens it for another ``ttl``.  Pure state machine: the caller passes ``now`` (a monotonic
clock reading) and reports outcomes.  Capacity waits are not failures, so callers simply do
not report them.
"""

from __future__ import annotations

import enum

import attrs

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@attrs.define
class CircuitBreaker:
    """Consecutive-failure circuit breaker; ``threshold <= 0`` disables it (always closed).

    A success from any request closes the breaker (it proves the node answers).  A failure
    while half-open re-opens it, whether or not it came from the probe; a late failure of a
    request admitted before the breaker opened does not extend the open period.
    """

    threshold: int = attrs.field(default=3, validator=attrs.validators.instance_of(int))
    ttl: float = attrs.field(default=30.0, converter=float, validator=attrs.validators.ge(0.0))
    _failures: int = attrs.field(default=0, init=False)
    _opened_at: float | None = attrs.field(default=None, init=False)
    _probe_inflight: bool = attrs.field(default=False, init=False)

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success (counted even when the breaker is disabled)."""
        return self._failures

    @property
    def probe_inflight(self) -> bool:
        """Whether the half-open probe has been admitted and not yet reported."""
        return self._probe_inflight

    def open_until(self) -> float | None:
        """When an open breaker turns half-open (e.g. for Retry-After); None if not tripped."""
        if self._opened_at is None:
            return None
        return self._opened_at + self.ttl

    def state(self, now: float) -> BreakerState:
        """Current state; OPEN reads as HALF_OPEN once ``ttl`` has passed since it opened."""
        if self._opened_at is None or not self.enabled:
            return BreakerState.CLOSED
        if now - self._opened_at >= self.ttl:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allows(self, now: float) -> bool:
        """Would :meth:`acquire` admit a request right now?  No side effect."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        return not self._probe_inflight

    def acquire(self, now: float) -> bool:
        """Admit a request; in HALF_OPEN only the single probe gets through."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probe_inflight:
            return False
        self._probe_inflight = True
        return True

    def record_success(self, now: float) -> None:
        """A request got a good answer: close the breaker and forget past failures."""
        del now  # part of the uniform event signature; a success needs no timestamp
        self._failures = 0
        self._opened_at = None
        self._probe_inflight = False

    def record_failure(self, now: float) -> None:
        """A request failed (connection error, 5xx, timeout): count it, maybe (re-)open."""
        self._failures += 1
        if not self.enabled:
            return
        state = self.state(now)
        if state is BreakerState.HALF_OPEN:
            self._opened_at = now
            self._probe_inflight = False
        elif state is BreakerState.CLOSED and self._failures >= self.threshold:
            self._opened_at = now

    def trip_until(self, now: float, until: float) -> None:
        """Open the breaker until `until` (another instance saw this node fail), unless it is
        already open for longer."""
        if not self.enabled or until <= now:
            return
        current = self.open_until()
        if current is None or current < until:
            self._opened_at = until - self.ttl
            self._probe_inflight = False

    def release_probe(self) -> None:
        """The probe ended without a verdict (e.g. client cancelled): let another probe in."""
        self._probe_inflight = False
