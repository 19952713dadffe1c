"""Blue/green traffic split (pure): parsing, the group draw, tiers, and `order` with a split."""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_strategies import Node

from lb.routing.split import Split, parse_weights, pick, session_unit, tiers
from lb.routing.strategies import Strategy, order

FAST = settings(max_examples=50, deadline=None)
GROUPS = ("blue", "green", "canary")


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[Node], dict[str, str], dict[str, float]]:
    """Candidates, their groups (some unlabelled) and weights (some 0, some groups unweighted)."""
    ids = draw(st.lists(st.integers(1, 60), min_size=1, max_size=8, unique=True))
    nodes = [Node(f"n{i}:1", inflight=draw(st.integers(0, 4)),
                  capacity=draw(st.integers(0, 4))) for i in ids]
    groups = {}
    for node in nodes:
        group = draw(st.sampled_from((*GROUPS, None)))
        if group is not None:
            groups[node.key] = group
    weights = draw(st.dictionaries(st.sampled_from(GROUPS),
                                   st.sampled_from((0.0, 1.0, 10.0, 90.0)), max_size=3))
    return nodes, groups, weights


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("blue=90,green=10", {"blue": 90.0, "green": 10.0}),
        (" blue = 1 ; green=0 ", {"blue": 1.0, "green": 0.0}),
        ("", {}),
        (None, {}),
        ({"blue": 3, "green": "1.5"}, {"blue": 3.0, "green": 1.5}),
    ],
)
def test_parse_weights(text: object, expected: dict[str, float]) -> None:
    assert parse_weights(text) == expected


@pytest.mark.parametrize(
    "bad", ["blue", "=3", "blue=-1", "blue=nan", "blue=inf", "blue=x", {"blue": True}, [1], 5]
)
def test_bad_weights_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_weights(bad)


@FAST
@given(st.dictionaries(st.sampled_from(GROUPS), st.integers(0, 100), min_size=1),
       st.integers(200, 2000))
def test_the_draw_converges_to_the_weights(weights: dict[str, int], n: int) -> None:
    """Over evenly spread draws (what a uniform RNG converges to), each group with a weight > 0
    is first in proportion to its weight, within one draw's share; a 0 weight never is."""
    floats = {g: float(w) for g, w in weights.items()}
    counts = collections.Counter(pick(floats, GROUPS, (i + 0.5) / n) for i in range(n))
    total = sum(w for w in weights.values() if w > 0)
    for group, weight in weights.items():
        if weight == 0 or total == 0:
            assert counts[group] == 0
        else:
            assert abs(counts[group] / n - weight / total) <= 1.0 / n + 1e-9
    if total == 0:
        assert counts == {None: n}


def test_a_seeded_rng_converges_too() -> None:
    rng = random.Random(7)
    weights = {"blue": 90.0, "green": 10.0}
    counts = collections.Counter(pick(weights, ("blue", "green"), rng.random())
                                 for _ in range(20_000))
    assert 0.88 < counts["blue"] / 20_000 < 0.92


@FAST
@given(fleets(), st.floats(0, 1, exclude_max=True))
def test_tiers_are_a_partition_with_the_drawn_group_first(
    fleet: tuple[list[Node], dict[str, str], dict[str, float]], u: float
) -> None:
    nodes, groups, weights = fleet
    chosen, first, rest, drained = tiers(nodes, Split(groups, weights, u))
    assert sorted(n.key for n in [*first, *rest, *drained]) == sorted(n.key for n in nodes)
    assert all(groups.get(n.key) == chosen for n in first)
    assert all(weights.get(groups[n.key]) == 0 for n in drained)
    present = {groups[n.key] for n in nodes if n.key in groups}
    if any(weights.get(g, 0) > 0 for g in present):
        assert chosen is not None and weights[chosen] > 0 and first
    else:
        assert chosen is None and not first


@FAST
@given(fleets(), st.floats(0, 1, exclude_max=True), st.sampled_from(list(Strategy)),
       st.integers(0, 100), st.none() | st.text(min_size=1, max_size=5))
def test_order_with_a_split_is_a_permutation_and_drained_groups_never_lead(
    fleet: tuple[list[Node], dict[str, str], dict[str, float]], u: float, strategy: Strategy,
    counter: int, session: str | None,
) -> None:
    nodes, groups, weights = fleet
    ordered = order(strategy, nodes, counter=counter, rng=random.Random(counter),
                    session=session, split=Split(groups, weights, u))
    assert sorted(n.key for n in ordered) == sorted(n.key for n in nodes)
    drained = {n.key for n in nodes if n.key in groups and weights.get(groups[n.key]) == 0}
    if len(nodes) > len(drained):
        assert ordered[0].key not in drained  # a 0-weight group gets no first pick
        # ... and is only failover: after every other node
        positions = [i for i, n in enumerate(ordered) if n.key in drained]
        assert positions == list(range(len(nodes) - len(drained), len(nodes)))
    chosen = pick(weights, [groups[n.key] for n in nodes if n.key in groups], u)
    if chosen is not None:
        members = [n for n in nodes if groups.get(n.key) == chosen]
        assert {n.key for n in ordered[:len(members)]} == {n.key for n in members}


@FAST
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=20, unique=True))
def test_session_unit_is_stable_and_in_range(sessions: list[str]) -> None:
    for session in sessions:
        u = session_unit(session)
        assert 0 <= u < 1
        assert u == session_unit(session)


def test_a_session_keeps_to_one_group_and_sessions_follow_the_weights() -> None:
    nodes = [Node("b1:1"), Node("b2:1"), Node("g1:1")]
    groups = {"b1:1": "blue", "b2:1": "blue", "g1:1": "green"}
    weights = {"blue": 75.0, "green": 25.0}
    firsts = collections.Counter()
    for i in range(4000):
        session = f"user-{i}"
        split = Split(groups, weights, session_unit(session))
        picks = {order(Strategy.LEAST_LOADED, nodes, counter=c, rng=random.Random(c),
                       session=session, split=split)[0].key for c in range(3)}
        assert len(picks) == 1  # sticky: the same node every time
        firsts[groups[picks.pop()]] += 1
    assert 0.72 < firsts["blue"] / 4000 < 0.78


def test_without_a_split_order_is_unchanged() -> None:
    nodes = [Node("a:1", inflight=2), Node("b:1"), Node("c:1", inflight=1)]
    for strategy in Strategy:
        assert order(strategy, nodes, counter=3, rng=random.Random(1)) == order(
            strategy, nodes, counter=3, rng=random.Random(1), split=None)


def test_unlabelled_nodes_are_failover_for_the_drawn_group() -> None:
    nodes = [Node("u:1"), Node("b:1", inflight=3, capacity=4), Node("g:1")]
    split = Split({"b:1": "blue", "g:1": "green"}, {"blue": 1.0, "green": 0.0}, 0.5)
    ordered = order(Strategy.LEAST_LOADED, nodes, counter=0, rng=random.Random(0), split=split)
    assert [n.key for n in ordered] == ["b:1", "u:1", "g:1"]  # busy blue still first
    # Only a drained group and unlabelled nodes: nothing to draw, the unlabelled lead.
    split = Split({"g:1": "green"}, {"green": 0.0}, 0.5)
    ordered = order(Strategy.LEAST_LOADED, [nodes[2], nodes[0]], counter=0,
                    rng=random.Random(0), split=split)
    assert [n.key for n in ordered] == ["u:1", "g:1"]
