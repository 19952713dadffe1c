"""Blue/green traffic split: a weight per value of one node label (``version`` by default)
decides which group of nodes a request tries first; the strategy then orders inside each group.

Pure: the caller passes ``u`` (uniform in [0, 1): its RNG, or `session_unit` so a session
always lands in the same group) and each candidate's label value.

The tiers of an order, each ordered by the strategy:

1. the chosen group: drawn among the groups present among the candidates with a weight > 0,
   with probability ``weight / sum of those weights``;
2. every other node: other groups with a weight > 0, nodes without the label, nodes whose
   value has no weight (failover for the chosen group);
3. drained groups (weight 0): last, as failover only, so a request never fails because the
   split left it no node, but a drained group never takes a first pick while any other node
   can. To take a group out for good, take its nodes out (down, removed).

When no candidate is in a group with a weight > 0 there is nothing to choose: tier 2 comes
first, then the drained ones.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs

__all__ = ["Split", "parse_weights", "pick", "session_unit", "tiers"]


class _Keyed(Protocol):
    @property
    def key(self) -> str: ...


K = TypeVar("K", bound=_Keyed)


@attrs.frozen(slots=True)
class Split:
    """One request's split: each labelled candidate's group (node key -> label value), the
    weights per group, and the draw ``u`` in [0, 1)."""

    groups: Mapping[str, str]
    weights: Mapping[str, float]
    u: float


def parse_weights(value: Any) -> dict[str, float]:
    """``blue=90,green=10`` (or a mapping) -> ``{"blue": 90.0, "green": 10.0}``; each weight a
    finite number >= 0. Empty (``""``, ``{}``, None) turns the split off. ValueError otherwise."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        pairs = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, str):
        pairs = []
        for item in value.replace(";", ",").split(","):
            if not item.strip():
                continue
            name, sep, number = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"expected label_value=weight, got {item.strip()!r}")
            pairs.append((name.strip(), number.strip()))
    else:
        raise ValueError("expected label_value=weight,... or an object of label value -> weight")
    weights: dict[str, float] = {}
    for name, number in pairs:
        if isinstance(number, bool):
            raise ValueError(f"weight of {name!r} must be a number >= 0")
        try:
            weight = float(number)
        except (TypeError, ValueError):
            raise ValueError(f"weight of {name!r} must be a number >= 0") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {name!r} must be a number >= 0")
        weights[name] = weight
    return weights


def session_unit(session: str) -> float:
    """A stable u in [0, 1) for a session, so its requests keep to one group (on every
    instance: a hash, no lookup)."""
    digest = hashlib.blake2b(session.encode(), digest_size=8, person=b"lb-split").digest()
    return (int.from_bytes(digest, "big") >> 11) * 2.0**-53


def pick(weights: Mapping[str, float], present: Iterable[str], u: float) -> str | None:
    """The group ``u`` falls in among the ``present`` groups with a weight > 0 (in name order,
    each taking ``weight / total`` of [0, 1)); None when there is none."""
    live = sorted({g for g in present if weights.get(g, 0.0) > 0})
    if not live:
        return None
    x = u * sum(weights[g] for g in live)
    for group in live:
        x -= weights[group]
        if x < 0:
            return group
    return live[-1]  # u close to 1 and rounding


def tiers(cands: Sequence[K], split: Split) -> tuple[str | None, list[K], list[K], list[K]]:
    """(the chosen group, its nodes, every other node, the drained groups' nodes); the lists
    keep the candidates' order and together are a permutation of them."""
    groups, weights = split.groups, split.weights
    chosen = pick(weights, (groups[c.key] for c in cands if c.key in groups), split.u)
    first: list[K] = []
    rest: list[K] = []
    drained: list[K] = []
    for cand in cands:
        group = groups.get(cand.key)
        if group is not None and group == chosen:
            first.append(cand)
        elif group is not None and weights.get(group) == 0:
            drained.append(cand)
        else:
            rest.append(cand)
    return chosen, first, rest, drained
