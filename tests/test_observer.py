"""The observer fan-out: every event reaches the observers that listen for it, once."""

from __future__ import annotations

from lb.obs.observer import Observer, Observers, Outcome, Trace


class Recorder:
    """A RequestObserver by shape only (not an Observer subclass): it hears every event."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def started(self, trace: Trace) -> None:
        self.events.append("started")

    def queued(self, trace: Trace, seconds: float) -> None:
        self.events.append(f"queued {seconds}")

    def attempt_finished(
        self, trace: Trace, node: str, outcome: Outcome, status: int | None, seconds: float
    ) -> None:
        self.events.append(f"attempt {node} {outcome.value} {status} {seconds}")

    def first_byte(self, trace: Trace, seconds: float) -> None:
        self.events.append(f"first_byte {seconds}")

    def finished(self, trace: Trace) -> None:
        self.events.append("finished")


class FinishedOnly(Observer):
    def __init__(self) -> None:
        self.finished_traces: list[Trace] = []

    def finished(self, trace: Trace) -> None:
        self.finished_traces.append(trace)


def test_each_event_reaches_the_observers_that_listen_for_it() -> None:
    recorder, finished_only = Recorder(), FinishedOnly()
    observers = Observers([recorder, finished_only, Observer()])
    trace = Trace("r", "chat", False, "m", 0.0)
    observers.started(trace)
    observers.queued(trace, 0.5)
    observers.attempt_finished(trace, "n:1", Outcome.BUSY, 429, 0.25)
    observers.first_byte(trace, 1.0)
    observers.finished(trace)
    assert recorder.events == [
        "started", "queued 0.5", "attempt n:1 busy 429 0.25", "first_byte 1.0", "finished"
    ]
    assert finished_only.finished_traces == [trace]
    # Only the events someone listens for are fanned out at all.
    assert len(observers._started) == 1 and len(observers._finished) == 2
