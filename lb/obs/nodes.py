"""Per-node request and failure counts for `/v1/nodes`, kept by an observer (dispatch holds no
counters of its own)."""

from __future__ import annotations

from collections import Counter

import attrs

from lb.obs.observer import Observer, Outcome, Trace


@attrs.define(eq=False)
class NodeCounters(Observer):
    """Attempts sent to each node, and those that failed by the node's own fault."""

    requests: Counter[str] = attrs.field(factory=Counter)
    failures: Counter[str] = attrs.field(factory=Counter)

    def attempt_finished(
        self, trace: Trace, node: str, outcome: Outcome, status: int | None, seconds: float
    ) -> None:
        self.requests[node] += 1
        if outcome is Outcome.FAILURE:
            self.failures[node] += 1


