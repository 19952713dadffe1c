"""A deployment's own rate limits (`rpm`/`tpm` in the catalogue or a `nodes:` entry): the
router sends it no more than that, with the sliding windows of the key limits
(`lb.policy.limits`), so both mean the same: at most `rpm` requests and `tpm` tokens in any
60 seconds.

Tokens: the prompt estimate (request bytes / 4, as the gate counts) is taken when a request is
sent to the node and replaced by the real usage (prompt + completion) when the attempt ends
(`NodeRateObserver`), so a long answer may carry the window over `tpm`; the node then takes
nothing new until it is back under. A prompt larger than the whole `tpm` still goes to an
empty window (counted at `tpm`), or it could never be served.

Per instance: with a fleet each instance keeps 1/n of each limit (n: the live instances it
knows of, as for the key limits while Redis is down), so the fleet never sends more than the
limit but may, with uneven traffic, send less.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from lb.obs.observer import Observer, Outcome, Trace
from lb.policy.limits import SlidingWindow

_BYTES_PER_TOKEN = 4


def estimate(body: bytes) -> int:
    """The prompt tokens counted before the real usage is known (the gate's figure)."""
    return len(body) // _BYTES_PER_TOKEN + 1


class NodeRate:
    """One node's windows on this instance, and the attempts whose tokens are not settled."""

    __slots__ = ("holds", "instances", "requests", "rpm", "tokens", "tpm")

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.requests = None if rpm is None else SlidingWindow(rpm)
        self.tokens = None if tpm is None else SlidingWindow(tpm)
        self.instances = 1
        # request id -> the handle of its estimate in the token window (until its attempt ends)
        self.holds: dict[str, int] = {}

    def share(self, instances: int) -> None:
        """This instance's part of the limits when `instances` share the node (at least 1)."""
        self.instances = n = max(1, instances)
        if self.requests is not None and self.rpm is not None:
            self.requests.limit = max(1, self.rpm // n)
        if self.tokens is not None and self.tpm is not None:
            self.tokens.limit = max(1, self.tpm // n)

    def wait(self, now: float, tokens: int = 1) -> float:
        """Seconds until a request of `tokens` prompt tokens may go (0: now)."""
        wait = 0.0
        requests = self.requests
        if requests is not None and not requests.fits(now, 1):
            wait = requests.retry_after(now, 1)
        window = self.tokens
        if window is not None:
            weight = min(tokens, window.limit)
            if not window.fits(now, weight):
                wait = max(wait, window.retry_after(now, weight))
        return wait

    def take(self, now: float, request_id: str, tokens: int) -> None:
        """Count a request sent to the node (after `wait` said 0 at this `now`)."""
        if self.requests is not None:
            self.requests.take(now, 1)
        window = self.tokens
        if window is not None:
            self.holds[request_id] = window.take(now, min(tokens, window.limit))

    def settle(self, request_id: str, tokens: int | None, now: float) -> None:
        """The attempt ended: its real tokens replace the estimate (kept when unknown)."""
        handle = self.holds.pop(request_id, None)
        if handle is not None and tokens is not None and self.tokens is not None:
            self.tokens.adjust(handle, tokens, now)


class _Limited(Protocol):
    rate: NodeRate | None


class NodeRateObserver(Observer):
    """Settles the token windows of limited nodes with each attempt's real usage."""

    __slots__ = ("node",)

    def __init__(self, node: Callable[[str], _Limited | None]) -> None:
        self.node = node  # node key -> the node (the registry's lookup)

    def attempt_finished(
        self, trace: Trace, node: str, outcome: Outcome, status: int | None, seconds: float
    ) -> None:
        found = self.node(node)
        rate = None if found is None else found.rate
        if rate is None or rate.tokens is None:
            return
        tokens = None
        if trace.prompt_tokens is not None or trace.completion_tokens is not None:
            tokens = (trace.prompt_tokens or 0) + (trace.completion_tokens or 0)
        rate.settle(trace.request_id, tokens, trio.current_time())
