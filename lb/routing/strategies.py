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
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Protocol, TypeVar

import attrs

from lb.routing.split import Split, tiers

__all__ = [
    "NEEDS_LATENCY",
    "STRATEGIES",
    "Candidate",
    "PrefixHint",
    "Strategy",
    "cost_optimized",
    "failover",
    "latency_optimized",
    "least_loaded",
    "load_balanced",
    "order",
    "p2c",
    "parse_strategy",
    "prefix_aware",
    "price_of",
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
    # Rotation first, then a stable sort: ties keep the rotated order.
    return sorted(_rotated(cands, counter), key=_load_fn(cands))


def _load_fn(cands: Sequence[C]) -> Callable[[C], float]:
    """A node's load, ``inflight / capacity``; uncapped nodes against the largest cap among
    ``cands`` (1 if none is capped)."""
    ref = max((c.capacity for c in cands if c.capacity > 0), default=1)
    return lambda c: c.inflight / (c.capacity if c.capacity > 0 else ref)


def p2c(cands: Sequence[C], counter: int, rng: random.Random) -> list[C]:
    """Power of two choices: two candidates drawn at random (uniformly, weights aside), the less
    loaded of the two first (the first drawn on a tie); then every other node, the loser of the
    draw included, by load as `least_loaded` orders them (ties rotated by ``counter``).

    Two random picks avoid the herd that a strict least-loaded order sends to one node when
    every instance reads the same stale loads, and still almost always miss the busiest.
    """
    if len(cands) <= 1:
        return list(cands)
    load = _load_fn(cands)
    i, j = rng.sample(range(len(cands)), 2)
    first = cands[j] if load(cands[j]) < load(cands[i]) else cands[i]
    # Loads measured against the whole set, as the draw measured them.
    rest = sorted(_rotated([c for c in cands if c is not first], counter), key=load)
    return [first, *rest]


def failover(cands: Sequence[C]) -> list[C]:
    """Strict configuration order: the first node takes every request; dispatch moves on to the
    next only when one is down (not a candidate), its breaker is open or it is full."""
    return list(cands)


def _known_first(
    cands: Sequence[C], counter: int, figures: Mapping[str, float]
) -> tuple[list[C], list[C], list[C]]:
    """(unknown and idle, known, unknown and busy) candidates, each in rotated order."""
    idle: list[C] = []
    known: list[C] = []
    busy: list[C] = []
    for cand in _rotated(cands, counter):
        if cand.key in figures:
            known.append(cand)
        elif cand.inflight == 0:
            idle.append(cand)
        else:
            busy.append(cand)
    return idle, known, busy


def latency_optimized(
    cands: Sequence[C], counter: int, latency: Mapping[str, float] | None
) -> list[C]:
    """Lowest recent latency first (``latency``: node key -> seconds, from the observer, already
    decayed by age; a node missing from it is unknown).

    Exploration: an unknown node with nothing in flight goes *first* (one request measures it,
    a stale figure having decayed to unknown gets measured again the same way); the known ones
    follow by ascending latency, then by load; unknown nodes that already have requests in
    flight (their figure is on its way) go last. Ties are rotated by ``counter``.
    """
    if len(cands) <= 1:
        return list(cands)
    figures = latency or {}
    idle, known, busy = _known_first(cands, counter, figures)
    load = _load_fn(cands)
    known.sort(key=lambda c: (figures[c.key], load(c)))
    return [*idle, *known, *busy]


def load_balanced(
    cands: Sequence[C], counter: int, latency: Mapping[str, float] | None
) -> list[C]:
    """Weighted least-loaded with recent latency: ascending

        score = (1 + load) * latency / weight

    ``load`` is ``inflight / capacity`` as `least_loaded` measures it, ``latency`` the node's
    recent figure in seconds (a node without one counts as the median of the known figures;
    with none known every node counts 1, and this is least-loaded weighted by ``weight``). So a
    node twice as fast takes about twice the load before it ranks below the slower one.
    Non-positive weights go last; ties are rotated by ``counter``.
    """
    if len(cands) <= 1:
        return list(cands)
    figures = latency or {}
    known = sorted(figures[c.key] for c in cands if c.key in figures)
    default = known[len(known) // 2] if known else 1.0
    load = _load_fn(cands)

    def score(cand: C) -> float:
        w = cand.weight
        if w <= 0:
            return math.inf
        return (1.0 + load(cand)) * figures.get(cand.key, default) / w

    return sorted(_rotated(cands, counter), key=score)


def cost_optimized(
    cands: Sequence[C], counter: int, prices: Mapping[str, float] | None
) -> list[C]:
    """Cheapest first (``prices``: node key -> price per token), equal prices by load; nodes
    without a price follow, by load. With no prices at all this is `least_loaded`."""
    if len(cands) <= 1:
        return list(cands)
    if not prices:
        return least_loaded(cands, counter)
    load = _load_fn(cands)
    priced = [c for c in _rotated(cands, counter) if c.key in prices]
    unpriced = [c for c in _rotated(cands, counter) if c.key not in prices]
    priced.sort(key=lambda c: (prices[c.key], load(c)))
    unpriced.sort(key=load)
    return [*priced, *unpriced]


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


@attrs.frozen(slots=True)
class PrefixHint:
    """What PREFIX_AWARE knows of a request: the node that owns its longest known prefix (None:
    none of the candidates does), the hash of its first block (b"": no prompt) and ε."""

    owner: str | None
    first: bytes
    balance: float = 0.25


def _overloaded(cands: Sequence[C], node: C, balance: float) -> bool:
    """Bounded load: is ``node`` above ``(1 + balance)`` times the candidates' mean load?

    A node's load is smoothed by the request being placed: ``(inflight + 1) / capacity``, an
    uncapped node measured against the largest cap among the candidates (1 if none is capped,
    so uncapped nodes compare ``inflight + 1`` with the mean of ``inflight + 1``). The +1 keeps
    idle nodes comparable (0 vs 0 is never over the bound) and makes one request count.
    """
    ref = max((c.capacity for c in cands if c.capacity > 0), default=1)

    def load(c: C) -> float:
        return (c.inflight + 1) / (c.capacity if c.capacity > 0 else ref)

    mean = sum(load(c) for c in cands) / len(cands)
    return load(node) > (1.0 + balance) * mean


def prefix_aware(cands: Sequence[C], counter: int, hint: PrefixHint | None) -> list[C]:
    """The owner of the request's prefix first, the rest by load; the owner is
    ``hint.owner`` (the node that served the longest known prefix), or when no candidate owns
    one, the rendezvous winner for the first block, so every lb instance sends a new prefix to
    the same node. Bounded load: when that node is `_overloaded`, the request spills to the
    next node in the prefix's rendezvous order that is not (so a hot prefix spills to the
    same few nodes, whose caches then hold it too), else to the least loaded; without a
    prompt, this is `least_loaded`."""
    if len(cands) <= 1:
        return list(cands)
    if hint is None or not hint.first:
        return least_loaded(cands, counter)
    owner = next((c for c in cands if c.key == hint.owner), None) if hint.owner else None
    if owner is None:
        owner = rendezvous(cands, hint.first.hex())[0]
    if _overloaded(cands, owner, hint.balance):
        spill = next(
            (c for c in rendezvous(cands, hint.first.hex())
             if c is not owner and not _overloaded(cands, c, hint.balance)),
            None,
        )
        if spill is None:
            return least_loaded(cands, counter)
        owner = spill
    return [owner, *least_loaded([c for c in cands if c is not owner], counter)]


class Strategy(enum.Enum):
    """Values of the ``ROUTING_STRATEGY`` setting (and of ``x-lb-strategy``)."""

    ROUND_ROBIN = "ROUND_ROBIN"
    RANDOM = "RANDOM"  # weighted by `weight`; WEIGHTED and LiteLLM's simple-shuffle are this
    LEAST_LOADED = "LEAST_LOADED"
    P2C = "P2C"
    FAILOVER = "FAILOVER"
    LATENCY_OPTIMIZED = "LATENCY_OPTIMIZED"
    LOAD_BALANCED = "LOAD_BALANCED"
    COST_OPTIMIZED = "COST_OPTIMIZED"
    PREFIX_AWARE = "PREFIX_AWARE"


#: Accepted spellings (upper case, ``_`` for ``-`` and spaces) to strategies: lb's own names,
#: AILB's (``round_robin``, ``cost_optimized``, ``latency_optimized``, ``load_balanced``,
#: ``failover``, ``random``) and LiteLLM's router strategies.
STRATEGIES: Mapping[str, Strategy] = MappingProxyType(
    {
        **{s.value: s for s in Strategy},
        "WEIGHTED": Strategy.RANDOM,
        "POWER_OF_TWO": Strategy.P2C,
        "SIMPLE_SHUFFLE": Strategy.RANDOM,
        "LEAST_BUSY": Strategy.LEAST_LOADED,
        "LATENCY_BASED_ROUTING": Strategy.LATENCY_OPTIMIZED,
        "COST_BASED_ROUTING": Strategy.COST_OPTIMIZED,
        "CACHE_AWARE": Strategy.PREFIX_AWARE,
        # LiteLLM's counts tokens/requests against each deployment's tpm/rpm; lb has no such
        # limits per node yet, so the closest is the least loaded.
        "USAGE_BASED_ROUTING": Strategy.LEAST_LOADED,
        "USAGE_BASED_ROUTING_V2": Strategy.LEAST_LOADED,
    }
)

#: Strategies that read the latency figures (dispatch fetches them only for these).
NEEDS_LATENCY = frozenset({Strategy.LATENCY_OPTIMIZED, Strategy.LOAD_BALANCED})


def parse_strategy(text: str) -> Strategy:
    """Parse a strategy name case-insensitively; ``-`` and spaces count as ``_``."""
    name = text.strip().upper().replace("-", "_").replace(" ", "_")
    try:
        return STRATEGIES[name]
    except KeyError:
        valid = ", ".join(STRATEGIES)
        raise ValueError(f"invalid routing strategy {text!r}; expected one of: {valid}") from None


def price_of(labels: Mapping[str, str]) -> float | None:
    """A node's price per token from its labels: ``price``, else ``price_in`` + ``price_out``
    (either alone counts); None when it has none or one is not a number >= 0."""
    text = labels.get("price")
    try:
        if text is not None:
            price = float(text)
        elif "price_in" in labels or "price_out" in labels:
            price = float(labels.get("price_in", 0)) + float(labels.get("price_out", 0))
        else:
            return None
    except ValueError:
        return None
    return price if math.isfinite(price) and price >= 0 else None


def order(
    strategy: Strategy, cands: Sequence[C], *, counter: int, rng: random.Random,
    session: str | None = None, latency: Mapping[str, float] | None = None,
    prices: Mapping[str, float] | None = None, prefix: PrefixHint | None = None,
    split: Split | None = None,
) -> list[C]:
    """Order ``cands`` by ``strategy`` (by ``session`` first: a sticky session outranks any
    strategy); the one entry point, so every caller gets the same fallbacks. ``latency`` (node
    key -> recent seconds) is read by `NEEDS_LATENCY` strategies, ``prices`` (node key -> price
    per token) by COST_OPTIMIZED, ``prefix`` (the owner of the request's prompt prefix) by
    PREFIX_AWARE. ``split`` (blue/green): the chosen group's nodes first, each tier ordered
    by the rest of the arguments (see `lb.routing.split`)."""
    if len(cands) <= 1:
        return list(cands)
    if split is not None:
        return [
            cand
            for tier in tiers(cands, split)[1:]
            for cand in order(
                strategy, tier, counter=counter, rng=rng, session=session, latency=latency,
                prices=prices, prefix=prefix,
            )
        ]
    if session:
        return rendezvous(cands, session)
    if strategy is Strategy.LEAST_LOADED:
        return least_loaded(cands, counter)
    if strategy is Strategy.ROUND_ROBIN:
        return round_robin(cands, counter)
    if strategy is Strategy.RANDOM:
        return random_order(cands, rng)
    if strategy is Strategy.P2C:
        return p2c(cands, counter, rng)
    if strategy is Strategy.FAILOVER:
        return failover(cands)
    if strategy is Strategy.LATENCY_OPTIMIZED:
        return latency_optimized(cands, counter, latency)
    if strategy is Strategy.LOAD_BALANCED:
        return load_balanced(cands, counter, latency)
    if strategy is Strategy.PREFIX_AWARE:
        return prefix_aware(cands, counter, prefix)
    return cost_optimized(cands, counter, prices)
