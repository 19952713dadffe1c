"""One key's limits and this instance's counters for them, pure (time passed in): the decision
to admit a request, the figures of the rate-limit headers, and the settling of a request's real
usage. The fleet's Redis script makes the same decision from the same `Limits`."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from lb.policy.limits import SlidingWindow, TokenBucket, format_reset


@attrs.frozen(slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    burst: int | None = None  # requests at once, refilled at rpm/60 per second (needs rpm)
    parallel: int | None = None

    @property
    def any(self) -> bool:
        return (self.rpm, self.tpm, self.parallel) != (None, None, None)

    def share(self, parts: int) -> Limits:
        """This instance's part of the limits when the fleet cannot be asked (Redis down):
        each of `parts` live instances gets limit // parts (at least 1)."""
        if parts <= 1:
            return self

        def cut(value: int | None) -> int | None:
            return None if value is None else max(1, value // parts)

        return Limits(cut(self.rpm), cut(self.tpm), cut(self.burst), cut(self.parallel))


@attrs.define(slots=True, eq=False)
class Figures:
    """What the `x-ratelimit-*` headers say (None: no such limit). Not frozen: one is made
    per admitted request, and a frozen class's __init__ costs several times more."""

    limit_requests: int | None = None
    remaining_requests: int = 0
    reset_requests: float = 0.0
    limit_tokens: int | None = None
    remaining_tokens: int = 0
    reset_tokens: float = 0.0

    def headers(self) -> list[tuple[bytes, bytes]]:
        # Built on every admitted request: literals and bytes formatting, nothing more.
        requests, tokens = self.limit_requests, self.limit_tokens
        if requests is not None:
            out = [
                (b"x-ratelimit-limit-requests", b"%d" % requests),
                (b"x-ratelimit-remaining-requests", b"%d" % max(0, self.remaining_requests)),
                (b"x-ratelimit-reset-requests", reset_bytes(self.reset_requests)),
            ]
            if tokens is None:
                return out
        elif tokens is None:
            return []
        else:
            out = []
        out.append((b"x-ratelimit-limit-tokens", b"%d" % tokens))
        out.append((b"x-ratelimit-remaining-tokens", b"%d" % max(0, self.remaining_tokens)))
        out.append((b"x-ratelimit-reset-tokens", reset_bytes(self.reset_tokens)))
        return out


def reset_bytes(seconds: float) -> bytes:
    """`format_reset` as bytes; under a minute (nearly always) without a str in between."""
    if seconds < 60:
        return b"%.3gs" % (seconds if seconds > 0 else 0.0)
    return format_reset(seconds).encode()


@attrs.frozen(slots=True)
class Refusal:
    limit: str  # "requests", "tokens" or "parallel"
    retry_after: float
    figures: Figures


@attrs.define(slots=True, eq=False)
class Ticket:
    """An admitted request's hold on the counters, until it settles."""

    figures: Figures
    tokens: int | None = None  # the handle of its estimate in the tokens window
    parallel: bool = False
    ref: str | None = None  # the fleet's id of the admission (in Redis), if it made it


@attrs.define(slots=True, eq=False)
class KeyCounters:
    """This instance's counters of one key (the whole truth without a fleet)."""

    requests: SlidingWindow | None = None
    tokens: SlidingWindow | None = None
    bucket: TokenBucket | None = None
    inflight: int = 0
    limits: Limits = attrs.field(factory=Limits)

    def configure(self, limits: Limits, now: float) -> None:
        """Follow a key's changed limits; what was already admitted stays counted."""
        if limits is self.limits:
            return
        if limits == self.limits:  # the same limits, a reloaded key: remember this object
            self.limits = limits
            return
        self.requests = _window(self.requests, limits.rpm)
        self.tokens = _window(self.tokens, limits.tpm)
        if limits.burst is None or limits.rpm is None:
            self.bucket = None
        elif self.bucket is None or self.bucket.capacity != limits.burst:
            self.bucket = TokenBucket(limits.burst, limits.rpm / 60.0, last=now)
        self.limits = limits

    def admit(self, now: float, estimate: int) -> Ticket | Refusal:
        """Admit a request of `estimate` prompt tokens, or say which limit refuses it."""
        requests, tokens, bucket, parallel = (
            self.requests, self.tokens, self.bucket, self.limits.parallel
        )
        if (  # the common case, tested without building the refusal's figures
            (requests is None or requests.fits(now, 1))
            and (tokens is None or tokens.fits(now, estimate))
            and (bucket is None or bucket.fits(now))
            and (parallel is None or self.inflight < parallel)
        ):
            return self.take(now, estimate)
        refusal = self.check(now, estimate)
        assert refusal is not None
        return refusal

    def check(self, now: float, estimate: int) -> Refusal | None:
        """Which limit would refuse the request (None: it fits); changes nothing."""
        limits = self.limits
        waits: dict[str, float] = {}
        if self.requests is not None and not self.requests.fits(now, 1):
            waits["requests"] = self.requests.retry_after(now, 1)
        if self.bucket is not None and not self.bucket.fits(now):
            waits["requests"] = max(waits.get("requests", 0.0), self.bucket.retry_after(now))
        if self.tokens is not None and not self.tokens.fits(now, estimate):
            waits["tokens"] = self.tokens.retry_after(now, estimate)
        if limits.parallel is not None and self.inflight >= limits.parallel:
            waits["parallel"] = 1.0  # unknown: when one of them ends
        if not waits:
            return None
        which = max(waits, key=lambda name: waits[name])
        return Refusal(which, waits[which], self._figures(now))

    def take(self, now: float, estimate: int) -> Ticket:
        """Count an admission (after `check` said it fits, at the same `now`)."""
        if self.requests is not None:
            self.requests.take(now, 1)
        if self.bucket is not None:
            self.bucket.take(now)
        entry = self.tokens.take(now, estimate) if self.tokens is not None else None
        held = self.limits.parallel is not None
        if held:
            self.inflight += 1
        return Ticket(self._figures(now), entry, held)

    def settle(self, ticket: Ticket, tokens: int | None, now: float) -> None:
        """The request ended: its real tokens replace the estimate; its parallel slot frees."""
        if ticket.tokens is not None and self.tokens is not None and tokens is not None:
            self.tokens.adjust(ticket.tokens, tokens, now)
        if ticket.parallel:
            ticket.parallel = False
            self.inflight -= 1

    def figures(self, now: float) -> Figures:
        requests, tokens = self.requests, self.tokens
        if requests is not None:
            requests.used(now)
        if tokens is not None:
            tokens.used(now)
        return self._figures(now)

    def _figures(self, now: float) -> Figures:
        """The figures, the windows being expired up to `now` already (admit did it)."""
        requests, tokens = self.requests, self.tokens
        return Figures(
            self.limits.rpm,
            int(requests.limit - requests.total) if requests is not None else 0,
            requests.times[0] + requests.span - now if requests and requests.times else 0.0,
            self.limits.tpm,
            int(tokens.limit - tokens.total) if tokens is not None else 0,
            tokens.times[0] + tokens.span - now if tokens and tokens.times else 0.0,
        )


def _window(window: SlidingWindow | None, limit: int | None) -> SlidingWindow | None:
    if limit is None:
        return None
    if window is None:
        return SlidingWindow(limit)
    window.limit = limit
    return window




def parse_limits(value: object) -> Limits:
    """`{rpm, tpm, burst, parallel}` (any subset; whole numbers >= 1) -> Limits."""
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping such as {rpm: 60, tpm: 100000}")
    unknown = set(value) - {"rpm", "tpm", "burst", "parallel"}
    if unknown:
        raise ValueError(f"unknown limit {sorted(map(str, unknown))[0]!r} "
                         "(rpm, tpm, burst, parallel)")
    numbers: dict[str, int] = {}
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{name} must be a whole number >= 1")
        numbers[str(name)] = number
    return Limits(**numbers)
