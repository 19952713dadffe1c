"""Node ordering strategies.

Dispatch needs an *order* of candidate nodes, not a single pick: the first is tried first and
the rest are the failover order.  Every function returns a new list that is a permutation of
its input and never mutates it.  They run on every request, so they stay O(n log n) at worst
and skip all work for a single candidate.  State (counters, RNGs) is passed in by the caller
so these stay pure and reproducible.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Protocol, TypeVar

__all__ = [
    "STRATEGIES",
    "Candidate",
    "Strategy",
    "least_loaded",
    "order",
    "parse_strategy",
    "random_order",
    "rendezvous",
    "round_robin",
]


class Candidate(Protocol):
    """What a strategy needs to know about a node."""

    @property
    def key(self) -> str:
        """``host:port``, unique among candidates."""
        ...

    @property
    def inflight(self) -> int:
        """Requests currently in flight on the node."""
        ...

    @property
    def capacity(self) -> int:
        """Maximum concurrent requests; 0 means uncapped."""
        ...

    @property
    def weight(self) -> float:
        """Relative traffic share, > 0 (1.0 by default)."""
        ...


C = TypeVar("C", bound=Candidate)


def _rotated(cands: Sequence[C], counter: int) -> list[C]:
    start = counter % len(cands)
    return [*cands[start:], *cands[:start]]


def round_robin(cands: Sequence[C], counter: int) -> list[C]:
    """Rotate by ``counter`` (the caller increments it per request); weights are ignored."""
    if len(cands) <= 1:
        return list(cands)
    return _rotated(cands, counter)


def random_order(cands: Sequence[C], rng: random.Random) -> list[C]:
    """Weighted random order: the first pick is weight-proportional, and so is each next one.

    Efraimidis-Spirakis: sort by ``u ** (1/w)`` descending, computed as ``ln(u) / w`` so tiny
    weights do not underflow to ties.  Non-positive weights go last.
    """
    if len(cands) <= 1:
        return list(cands)
    keys: list[float] = []
    for cand in cands:
        u = 1.0 - rng.random()  # (0, 1]: ln is defined
        w = cand.weight
        keys.append(math.log(u) / w if w > 0 else -math.inf)
    indices = sorted(range(len(cands)), key=keys.__getitem__, reverse=True)
    return [cands[i] for i in indices]


def least_loaded(cands: Sequence[C], counter: int) -> list[C]:
    """Ascending load, equal loads rotated by ``counter`` so equal nodes share traffic.

    Load is ``inflight / capacity`` for capped nodes.  Uncapped nodes are measured against the
    largest cap among the candidates (1 if none is capped), so one in-flight request on an
    uncapped node weighs like one on the roomiest capped node.
    """
    if len(cands) <= 1:
        return list(cands)
    ref = max((c.capacity for c in cands if c.capacity > 0), default=1)
    # Rotation first, then a stable sort: ties keep the rotated order.
    rotated = _rotated(cands, counter)
    return sorted(rotated, key=lambda c: c.inflight / (c.capacity if c.capacity > 0 else ref))


_U_SCALE = 2.0**-53


def _unit_interval(session_digest: bytes, node_key: str) -> float:
    """Stable u in (0, 1) for (session, node): blake2b keyed by the session's digest."""
    digest = hashlib.blake2b(node_key.encode(), key=session_digest, digest_size=8).digest()
    return ((int.from_bytes(digest, "big") >> 11) + 0.5) * _U_SCALE


def rendezvous(cands: Sequence[C], session_key: str) -> list[C]:
    """Sticky order by weighted rendezvous (highest-random-weight) hashing.

    Each node scores ``-weight / ln(u)`` with ``u`` from a stable hash of (session, node), so
    every process agrees and a node joining or leaving only moves the sessions it wins or
    held.  Ties (astronomically rare) fall back to the node key, which keeps the order a
    fixed total order independent of which other nodes are present.
    """
    if len(cands) <= 1:
        return list(cands)
    session_digest = hashlib.blake2b(session_key.encode(), digest_size=32).digest()

    def score(cand: C) -> tuple[float, str]:
        w = cand.weight
        s = -w / math.log(_unit_interval(session_digest, cand.key)) if w > 0 else 0.0
        return (s, cand.key)

    return sorted(cands, key=score, reverse=True)


class Strategy(enum.Enum):
    """Values of the ``ROUTING_STRATEGY`` setting."""

    ROUND_ROBIN = "ROUND_ROBIN"
    RANDOM = "RANDOM"
    LEAST_LOADED = "LEAST_LOADED"


#: Accepted ``ROUTING_STRATEGY`` spellings (after upper-casing) to strategies.
STRATEGIES: Mapping[str, Strategy] = MappingProxyType({s.value: s for s in Strategy})


def parse_strategy(text: str) -> Strategy:
    """Parse ``ROUTING_STRATEGY`` case-insensitively; ``-`` and spaces count as ``_``."""
    name = text.strip().upper().replace("-", "_").replace(" ", "_")
    try:
        return STRATEGIES[name]
    except KeyError:
        valid = ", ".join(STRATEGIES)
        raise ValueError(f"invalid routing strategy {text!r}; expected one of: {valid}") from None


def order(
    strategy: Strategy, cands: Sequence[C], *, counter: int, rng: random.Random,
    session: str | None = None,
) -> list[C]:
    """Order ``cands`` by ``strategy`` (by ``session`` first: a sticky session outranks any
    strategy); the one entry point, so every caller gets the same fallbacks."""
    if len(cands) <= 1:
        return list(cands)
    if session:
        return rendezvous(cands, session)
    if strategy is Strategy.ROUND_ROBIN:
        return round_robin(cands, counter)
    if strategy is Strategy.RANDOM:
        return random_order(cands, rng)
    return least_loaded(cands, counter)
