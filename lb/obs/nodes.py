"""Per-node request and failure counts for `/v1/nodes`, kept by an observer (dispatch holds no
counters of its own)."""

from __future__ import annotations

from collections import Counter

import attrs

from lb.obs.observer import Outcome, Trace


@attrs.define(eq=False)
class NodeCounters:
    """Attempts sent to each node, and those that failed by the node's own fault."""

    requests: Counter[str] = attrs.field(factory=Counter)
    failures: Counter[str] = attrs.field(factory=Counter)

    def started(self, trace: Trace) -> None:
        pass

    def queued(self, trace: Trace, seconds: float) -> None:
        pass

    def attempt_finished(
        self, trace: Trace, node: str, outcome: Outcome, status: int | None, seconds: float
    ) -> None:
        self.requests[node] += 1
        if outcome is Outcome.FAILURE:
            self.failures[node] += 1

    def first_byte(self, trace: Trace, seconds: float) -> None:
        pass

    def finished(self, trace: Trace) -> None:
        pass
