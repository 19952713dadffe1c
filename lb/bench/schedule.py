"""When requests are sent, pure: an open loop's Poisson arrivals from a seeded rng, and the
stop rule both loops share."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import attrs


def poisson_arrivals(rate: float, rng: random.Random) -> Iterator[float]:
    """Send times (seconds from the start, increasing) of a Poisson process of `rate` per
    second: exponential gaps with mean 1/rate. Infinite; the caller stops it."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number, got {rate}")
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def open_loop_schedule(
    rate: float, seed: int, *, duration: float | None = None, requests: int | None = None
) -> list[float]:
    """The open loop's whole schedule, decided before the first send: the same seed gives
    the same times, and a slow target cannot delay a send (no coordinated omission)."""
    stop = StopRule(duration=duration, requests=requests)
    times: list[float] = []
    for t in poisson_arrivals(rate, random.Random(seed)):
        if not stop.may_send(len(times), t):
            break
        times.append(t)
    return times


@attrs.frozen
class StopRule:
    """`--duration` and/or `--requests`: whichever comes first ends the sending."""

    duration: float | None = None
    requests: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.duration is None and self.requests is None:
            raise ValueError("give a duration or a number of requests")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be > 0")
        if self.requests is not None and self.requests < 0:
            raise ValueError("requests must be >= 0")

    def may_send(self, sent: int, elapsed: float) -> bool:
        """Whether request number `sent` (0-based) may start `elapsed` seconds in."""
        if self.requests is not None and sent >= self.requests:
            return False
        return self.duration is None or elapsed < self.duration
