"""One rule set for whether a node may take a request: planning, acquiring a slot and
`/v1/debug/eligible` all ask here, so they can never disagree."""

from __future__ import annotations

import enum

from lb.cluster.node import Node


class Reason(enum.StrEnum):
    ELIGIBLE = "eligible"
    DOWN = "down"
    DRAINING = "draining"
    MODEL_MISSING = "model_missing"
    BREAKER_OPEN = "breaker_open"
    RATE_LIMITED = "rate_limited"
    AT_CAPACITY = "at_capacity"


def blocked(node: Node, now: float) -> Reason | None:
    """Why `node` takes no request at all right now, or None. Capacity is not a block: a full
    node is queued for."""
    if not node.healthy:
        return Reason.DOWN
    if node.draining:
        return Reason.DRAINING
    if not node.breaker.allows(now):
        return Reason.BREAKER_OPEN
    if node.busy_until > now:
        return Reason.RATE_LIMITED
    rate = node.rate
    if rate is not None and rate.wait(now) > 0:  # its own rpm/tpm (a prompt's size aside)
        return Reason.RATE_LIMITED
    return None


def eligibility(node: Node, model: str, now: float) -> Reason:
    """Why `node` would or would not take a request for `model` now (the first reason found)."""
    if not node.healthy:
        return Reason.DOWN
    if model not in node.models:
        return Reason.MODEL_MISSING
    reason = blocked(node, now)
    if reason is not None:
        return reason
    if node.is_full():
        return Reason.AT_CAPACITY
    return Reason.ELIGIBLE
