"""The observer seam: what the request path tells the world, at five points, and nothing else.

Dispatch and the client's dialect call a `RequestObserver` when a request starts, when it
waited for capacity, when an attempt on a node ends (with its `Outcome`), when the first byte
went to the client, and when it finished. Metrics, the access log, the routing stats (and,
later, spend accounting and the live dashboard) are observers; the request path holds no
counters of its own and imports no metrics library.

A `Trace` is the one mutable record of a request: dispatch and the edge fill it in as the
request goes, and observers read it (never write it).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Protocol

import attrs


class Outcome(enum.Enum):
    SUCCESS = "success"  # the node answered (a 4xx is the request's fault, not the node's)
    FAILURE = "failure"  # the node's own fault: counted against it, feeds its breaker
    BUSY = "busy"  # the node said 429: try elsewhere, no verdict on its health
    NO_VERDICT = "no_verdict"  # ended by the client, lb or the deadline: nothing learnt


@attrs.define(slots=True, eq=False)
class Trace:
    """One proxied request as it went (times are trio clock readings or seconds)."""

    request_id: str
    kind: str  # chat, completion, embedding
    stream: bool
    requested_model: str
    arrival: float
    client: str = ""  # the client's address
    path: str = ""
    model: str | None = None  # resolved
    node: str | None = None  # the node of the last attempt (the one that answered, if any)
    attempts: int = 0
    failovers: int = 0  # attempts after a failed or busy one
    hedges: int = 0  # attempts started as hedges (HEDGE_AFTER_MS) beside a slow one
    queue_wait: float = 0.0  # seconds spent waiting for a free slot
    sent_to_node: float | None = None  # seconds from arrival to the request's first attempt
    first_byte: float | None = None  # seconds from arrival to the first byte to the client
    last_byte: float | None = None  # seconds from arrival to the last body byte to the client
    chunks: int = 0  # body writes to the client (a stream's events arrive in these)
    status: int = 0  # the status the client got (200 for a stream that broke after its head)
    error: str | None = None  # the error code the client got, in the answer or in the stream
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_estimated: bool = False  # completion tokens counted from stream events, not reported
    upstream_request_id: str | None = None
    client_gone: bool = False  # the client left (or stopped reading) before the end
    duration: float = 0.0  # seconds from arrival to the end


class RequestObserver(Protocol):
    def started(self, trace: Trace) -> None: ...

    def queued(self, trace: Trace, seconds: float) -> None:
        """The request waited `seconds` for a free slot (called once it has one, or gave up)."""
        ...

    def attempt_finished(
        self, trace: Trace, node: str, outcome: Outcome, status: int | None, seconds: float
    ) -> None: ...

    def first_byte(self, trace: Trace, seconds: float) -> None:
        """The first body byte went to the client, `seconds` after arrival (TTFT for streams)."""
        ...

    def finished(self, trace: Trace) -> None: ...


class Observer:
    """A `RequestObserver` that ignores every event: observers subclass it and override only
    the events they care for (which also lets `Observers` skip the rest)."""

    __slots__ = ()

    def started(self, trace: Trace) -> None:
        pass

    def queued(self, trace: Trace, seconds: float) -> None:
        pass

    def attempt_finished(
        self, trace: Trace, node: str, outcome: Outcome, status: int | None, seconds: float
    ) -> None:
        pass

    def first_byte(self, trace: Trace, seconds: float) -> None:
        pass

    def finished(self, trace: Trace) -> None:
        pass


class Observers(Observer):
    """Several observers as one; each event goes only to those that listen for it."""

    __slots__ = ("_attempt", "_finished", "_first_byte", "_queued", "_started", "observers")

    def __init__(self, observers: Sequence[RequestObserver] = ()) -> None:
        self.observers = tuple(observers)

        def listening(event: str) -> tuple[Any, ...]:
            ignored = getattr(Observer, event)
            return tuple(
                getattr(each, event) for each in self.observers
                if getattr(type(each), event, None) is not ignored
            )

        self._started = listening("started")
        self._queued = listening("queued")
        self._attempt = listening("attempt_finished")
        self._first_byte = listening("first_byte")
        self._finished = listening("finished")

    def started(self, trace: Trace) -> None:
        for started in self._started:
            started(trace)

    def queued(self, trace: Trace, seconds: float) -> None:
        for queued in self._queued:
            queued(trace, seconds)

    def attempt_finished(
        self, trace: Trace, node: str, outcome: Outcome, status: int | None, seconds: float
    ) -> None:
        for attempt_finished in self._attempt:
            attempt_finished(trace, node, outcome, status, seconds)

    def first_byte(self, trace: Trace, seconds: float) -> None:
        for first_byte in self._first_byte:
            first_byte(trace, seconds)

    def finished(self, trace: Trace) -> None:
        for finished in self._finished:
            finished(trace)
