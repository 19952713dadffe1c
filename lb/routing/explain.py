"""Why each candidate ranks where it does: the strategy's order, and for each node the parts
its place comes from (load, latency, price, prefix match, weight, blue/green group).

Pure, and computed only when `/v1/debug/eligible` or `/api/routing/stats` asks: never on the
request path. It calls the same `strategies.order` as dispatch with the same inputs, so the
ranking is the one a request arriving now would get (for the random strategies, one draw).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from lb.routing.split import Split, tiers
from lb.routing.strategies import (
    Candidate,
    PrefixHint,
    Strategy,
    _load_fn,
    _overloaded,
    order,
    rendezvous,
)

__all__ = ["BASIS", "explain", "parts"]

#: What each strategy sorts by, in words (the `basis` of an explanation).
BASIS: Mapping[Strategy, str] = {
    Strategy.LEAST_LOADED: "ascending load (inflight / capacity), ties rotated per request",
    Strategy.ROUND_ROBIN: "each node first in turn (a rotation per request); weights ignored",
    Strategy.RANDOM: "weighted random: first with probability weight / sum of weights",
    Strategy.P2C: "two nodes drawn at random, the less loaded first; then ascending load",
    Strategy.FAILOVER: "configuration order",
    Strategy.LATENCY_OPTIMIZED: (
        "unmeasured idle nodes first (exploration), then ascending latency, then load; "
        "unmeasured busy nodes last"
    ),
    Strategy.LOAD_BALANCED: "ascending (1 + load) x latency / weight",
    Strategy.COST_OPTIMIZED: "ascending price, then load; nodes without a price after",
    Strategy.PREFIX_AWARE: (
        "the owner of the longest matched prompt prefix (else the rendezvous winner of the "
        "first block) unless over the load bound; then ascending load"
    ),
}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def parts(
    cand: Candidate, cands: Sequence[Candidate], *,
    latency: Mapping[str, float] | None = None, prices: Mapping[str, float] | None = None,
    prefix: PrefixHint | None = None, matched: Mapping[str, int] | None = None,
    group: str | None = None,
) -> dict[str, Any]:
    """The score parts of ``cand`` among ``cands``: load (``inflight / capacity``, an uncapped
    node against the largest cap), latency (ms), price, weight, prefix match and group."""
    load = _load_fn(cands)(cand)
    figure = (latency or {}).get(cand.key)
    result: dict[str, Any] = {
        "load": round(load, 4),
        "inflight": cand.inflight,
        "capacity": cand.capacity,
        "latency_ms": _ms(figure),
        "price": (prices or {}).get(cand.key),
        "weight": cand.weight,
        "group": group,
    }
    if prefix is not None:
        result["prefix"] = {
            "matched_blocks": (matched or {}).get(cand.key, 0),
            "owner": prefix.owner == cand.key,
        }
    return result


def _why(
    strategy: Strategy, cand: Candidate, rank: int, cands: Sequence[Candidate],
    latency: Mapping[str, float], prices: Mapping[str, float], prefix: PrefixHint | None,
) -> str:
    """One line on why ``cand`` is at ``rank`` (1 is first) inside its tier ``cands``."""
    load = _load_fn(cands)
    if strategy is Strategy.ROUND_ROBIN:
        return "first by this request's turn" if rank == 1 else f"rotation position {rank}"
    if strategy is Strategy.RANDOM:
        total = sum(c.weight for c in cands if c.weight > 0)
        share = cand.weight / total if total > 0 and cand.weight > 0 else 0.0
        return f"weighted draw: P(first) = {share:.3g}"
    if strategy is Strategy.FAILOVER:
        return f"configuration position {[c.key for c in cands].index(cand.key) + 1}"
    if strategy is Strategy.P2C and rank == 1:
        return f"won the two-node draw (load {load(cand):.3g})"
    if strategy is Strategy.LATENCY_OPTIMIZED:
        if cand.key in latency:
            return f"latency {latency[cand.key] * 1000:.1f} ms, load {load(cand):.3g}"
        if cand.inflight == 0:
            return "no latency figure and idle: explored first"
        return "no latency figure yet, being measured: after the measured nodes"
    if strategy is Strategy.LOAD_BALANCED:
        known = sorted(latency[c.key] for c in cands if c.key in latency)
        default = known[len(known) // 2] if known else 1.0
        seconds = latency.get(cand.key, default)
        if cand.weight <= 0:
            return "weight <= 0: last"
        score = (1 + load(cand)) * seconds / cand.weight
        return (f"(1 + {load(cand):.3g}) x {seconds * 1000:.1f} ms / {cand.weight:g} "
                f"= {score * 1000:.1f}")
    if strategy is Strategy.COST_OPTIMIZED and prices:
        if cand.key in prices:
            return f"price {prices[cand.key]:g}, load {load(cand):.3g}"
        return f"no price: after the priced nodes (load {load(cand):.3g})"
    if strategy is Strategy.PREFIX_AWARE and prefix is not None and prefix.first:
        owner = next((c for c in cands if c.key == prefix.owner), None)
        winner = owner or rendezvous(cands, prefix.first.hex())[0]
        if _overloaded(cands, winner, prefix.balance):
            return (f"prefix node {winner.key} over the load bound: ascending load "
                    f"(load {load(cand):.3g})")
        if cand is winner:
            if owner is not None:
                return "owns the request's longest matched prefix"
            return "no node owns the prefix: rendezvous winner of its first block"
        return f"not the prefix's node: ascending load (load {load(cand):.3g})"
    return f"load {load(cand):.3g}"


def explain(
    strategy: Strategy, cands: Sequence[Candidate], *, counter: int, rng: random.Random,
    session: str | None = None, latency: Mapping[str, float] | None = None,
    prices: Mapping[str, float] | None = None, prefix: PrefixHint | None = None,
    split: Split | None = None, matched: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Each candidate in the order `strategies.order` gives them: ``{"node", "rank", "tier",
    "why", "score": parts}``. ``matched``: prompt blocks each node owns of the request's
    prefix (for PREFIX_AWARE). ``tier`` is the blue/green tier (``chosen``, ``failover``,
    ``drained``; ``all`` without a split)."""
    ranked = order(strategy, cands, counter=counter, rng=rng, session=session,
                   latency=latency, prices=prices, prefix=prefix, split=split)
    tier_of: dict[str, tuple[str, Sequence[Candidate]]] = {}
    if split is not None:
        _, first, rest, drained = tiers(cands, split)
        for name, members in (("chosen", first), ("failover", rest), ("drained", drained)):
            for cand in members:
                tier_of[cand.key] = (name, members)
    groups = split.groups if split is not None else {}
    result: list[dict[str, Any]] = []
    position: dict[str, int] = {}
    for rank, cand in enumerate(ranked, 1):
        tier, tier_cands = tier_of.get(cand.key, ("all", cands))
        position[tier] = position.get(tier, 0) + 1
        if session:
            why = "sticky session: rendezvous hash of the session"
        else:
            why = _why(strategy, cand, position[tier], tier_cands, latency or {}, prices or {},
                       prefix)
        if split is not None:
            group = groups.get(cand.key)
            label = f"group {group!r}" if group is not None else "no group label"
            if tier == "chosen":
                why = f"{label} drawn for this request; {why}"
            elif tier == "drained":
                why = f"{label} drained (weight 0): failover only; {why}"
            else:
                why = f"{label}, not drawn: failover; {why}"
        result.append({
            "node": cand.key,
            "rank": rank,
            "tier": tier,
            "why": why,
            "score": parts(cand, tier_cands, latency=latency, prices=prices, prefix=prefix,
                           matched=matched, group=groups.get(cand.key)),
        })
    return result
