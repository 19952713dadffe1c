"""Node ordering strategies: permutations, fairness, weighting and rendezvous stability."""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.routing.strategies import (
    STRATEGIES,
    Strategy,
    least_loaded,
    order,
    parse_strategy,
    random_order,
    rendezvous,
    round_robin,
)

# Modest example counts and no per-example deadline: fast and not flaky on a busy CI box.
FAST = settings(max_examples=50, deadline=None)


@attrs.frozen
class Node:
    key: str
    inflight: int = 0
    capacity: int = 0
    weight: float = 1.0


def keys(nodes: Sequence[Node]) -> list[str]:
    return [n.key for n in nodes]


def load(node: Node, ref: int) -> float:
    return node.inflight / (node.capacity if node.capacity > 0 else ref)


def ref_capacity(nodes: Sequence[Node]) -> int:
    return max((n.capacity for n in nodes if n.capacity > 0), default=1)


@st.composite
def node_lists(draw: st.DrawFn, min_size: int = 0, max_size: int = 8) -> list[Node]:
    ids = draw(st.lists(st.integers(1, 60), min_size=min_size, max_size=max_size, unique=True))
    return [
        Node(
            key=f"10.0.0.{i}:8000",
            inflight=draw(st.integers(0, 20)),
            capacity=draw(st.sampled_from([0, 0, 1, 2, 4, 8])),
            weight=draw(st.sampled_from([0.5, 1.0, 1.0, 2.0, 9.0])),
        )
        for i in ids
    ]


counters = st.integers(0, 10**9)
seeds = st.integers(0, 2**32)


# ------------------------------------------------------------------------ all strategies


@FAST
@given(node_lists(), counters, seeds, st.text(max_size=12))
def test_every_strategy_returns_a_new_permutation(
    nodes: list[Node], counter: int, seed: int, session: str
) -> None:
    before = list(nodes)
    results = [
        round_robin(nodes, counter),
        random_order(nodes, random.Random(seed)),
        least_loaded(nodes, counter),
        rendezvous(nodes, session),
        *(order(s, nodes, counter=counter, rng=random.Random(seed)) for s in Strategy),
    ]
    for result in results:
        assert sorted(keys(result)) == sorted(keys(nodes))
        assert len(result) == len(nodes)
        assert result is not nodes
    assert nodes == before  # inputs are never mutated


def test_strategies_accept_tuples() -> None:
    nodes = (Node("a:1"), Node("b:1"))
    assert keys(round_robin(nodes, 1)) == ["b:1", "a:1"]
    assert isinstance(least_loaded(nodes, 0), list)


def test_order_dispatches() -> None:
    nodes = [Node("a:1", inflight=5), Node("b:1", inflight=0), Node("c:1", inflight=3)]
    rng = random.Random(7)
    assert order(Strategy.ROUND_ROBIN, nodes, counter=1, rng=rng) == round_robin(nodes, 1)
    assert order(Strategy.LEAST_LOADED, nodes, counter=0, rng=rng) == least_loaded(nodes, 0)
    assert order(Strategy.RANDOM, nodes, counter=0, rng=random.Random(3)) == random_order(
        nodes, random.Random(3)
    )


# ------------------------------------------------------------------------------ round robin


def test_round_robin_rotates() -> None:
    nodes = [Node("a:1"), Node("b:1"), Node("c:1")]
    assert keys(round_robin(nodes, 0)) == ["a:1", "b:1", "c:1"]
    assert keys(round_robin(nodes, 1)) == ["b:1", "c:1", "a:1"]
    assert keys(round_robin(nodes, 5)) == ["c:1", "a:1", "b:1"]


@FAST
@given(node_lists(min_size=1), counters)
def test_round_robin_each_node_first_once_per_cycle(nodes: list[Node], start: int) -> None:
    firsts = [round_robin(nodes, start + i)[0].key for i in range(len(nodes))]
    assert sorted(firsts) == sorted(keys(nodes))


# ------------------------------------------------------------------------------ random


@FAST
@given(node_lists(), seeds)
def test_random_reproduces_with_seeded_rng(nodes: list[Node], seed: int) -> None:
    assert random_order(nodes, random.Random(seed)) == random_order(nodes, random.Random(seed))


def test_random_varies_between_draws() -> None:
    nodes = [Node(f"n{i}:1") for i in range(4)]
    rng = random.Random(1)
    assert len({tuple(keys(random_order(nodes, rng))) for _ in range(50)}) > 1


def test_random_weighted_9_to_1_prefers_heavy_node() -> None:
    nodes = [Node("light:1", weight=1.0), Node("heavy:1", weight=9.0)]
    rng = random.Random(12345)
    draws = 4000
    firsts = collections.Counter(random_order(nodes, rng)[0].key for _ in range(draws))
    share = firsts["heavy:1"] / draws
    assert 0.87 < share < 0.93  # expected 0.9


def test_random_equal_weights_are_uniform() -> None:
    nodes = [Node(f"n{i}:1") for i in range(4)]
    rng = random.Random(99)
    draws = 4000
    firsts = collections.Counter(random_order(nodes, rng)[0].key for _ in range(draws))
    for node in nodes:
        assert 0.21 < firsts[node.key] / draws < 0.29  # expected 0.25


def test_random_nonpositive_weight_goes_last() -> None:
    nodes = [Node("off:1", weight=0.0), Node("on:1", weight=1e-9), Node("big:1", weight=5)]
    rng = random.Random(0)
    for _ in range(200):
        assert random_order(nodes, rng)[-1].key == "off:1"


# ------------------------------------------------------------------------------ least loaded


def test_least_loaded_orders_by_load_fraction() -> None:
    nodes = [
        Node("a:1", inflight=3, capacity=4),  # 0.75
        Node("b:1", inflight=1, capacity=4),  # 0.25
        Node("c:1", inflight=4, capacity=16),  # 0.25 - tie with b
        Node("d:1", inflight=0, capacity=2),  # 0.0
    ]
    assert keys(least_loaded(nodes, 0)) == ["d:1", "b:1", "c:1", "a:1"]


def test_least_loaded_uncapped_measured_against_largest_cap() -> None:
    nodes = [Node("capped:1", inflight=2, capacity=8), Node("free:1", inflight=3, capacity=0)]
    # free: 3/8 > capped: 2/8
    assert keys(least_loaded(nodes, 0)) == ["capped:1", "free:1"]
    nodes = [Node("capped:1", inflight=5, capacity=8), Node("free:1", inflight=3, capacity=0)]
    assert keys(least_loaded(nodes, 0)) == ["free:1", "capped:1"]


def test_least_loaded_all_uncapped_uses_raw_inflight() -> None:
    nodes = [Node("a:1", inflight=2), Node("b:1", inflight=1), Node("c:1", inflight=7)]
    assert keys(least_loaded(nodes, 0)) == ["b:1", "a:1", "c:1"]


@FAST
@given(node_lists(min_size=1), counters)
def test_least_loaded_is_sorted_by_load(nodes: list[Node], counter: int) -> None:
    ref = ref_capacity(nodes)
    loads = [load(n, ref) for n in least_loaded(nodes, counter)]
    assert loads == sorted(loads)


@FAST
@given(node_lists(min_size=2), counters, st.data())
def test_least_loaded_strictly_less_loaded_node_goes_first(
    nodes: list[Node], counter: int, data: st.DataObject
) -> None:
    # Make one node strictly the least loaded: idle while every other node is busy.
    idx = data.draw(st.integers(0, len(nodes) - 1))
    nodes = [attrs.evolve(n, inflight=max(n.inflight, 1)) for n in nodes]
    nodes[idx] = attrs.evolve(nodes[idx], inflight=0)
    assert least_loaded(nodes, counter)[0] == nodes[idx]


@FAST
@given(node_lists(min_size=1), counters)
def test_least_loaded_equal_nodes_share_first_place(nodes: list[Node], start: int) -> None:
    same = [attrs.evolve(n, inflight=2, capacity=4) for n in nodes]
    firsts = [least_loaded(same, start + i)[0].key for i in range(len(same))]
    assert sorted(firsts) == sorted(keys(same))


# ------------------------------------------------------------------------------ rendezvous


def _ring(n: int, weight: float = 1.0) -> list[Node]:
    return [Node(f"10.1.0.{i}:8000", weight=weight) for i in range(n)]


def test_rendezvous_is_stable_across_processes() -> None:
    # Pinned values: blake2b is unsalted, so every process (any PYTHONHASHSEED) and every
    # release must agree, or sticky sessions would scatter on restart.
    nodes = _ring(5)
    got = {s: rendezvous(nodes, s)[0].key for s in ("alice", "bob", "carol", "dave")}
    assert got == {
        "alice": "10.1.0.1:8000",
        "bob": "10.1.0.0:8000",
        "carol": "10.1.0.2:8000",
        "dave": "10.1.0.2:8000",
    }


@FAST
@given(node_lists(min_size=1), st.text(max_size=16))
def test_rendezvous_is_deterministic_and_order_independent(nodes: list[Node], session: str) -> None:
    assert rendezvous(nodes, session) == rendezvous(list(reversed(nodes)), session)


@settings(max_examples=100, deadline=None)
@given(node_lists(min_size=2), st.text(max_size=16), st.data())
def test_rendezvous_removing_a_node_only_moves_its_sessions(
    nodes: list[Node], session: str, data: st.DataObject
) -> None:
    first = rendezvous(nodes, session)[0]
    gone = data.draw(st.sampled_from(nodes))
    rest = [n for n in nodes if n is not gone]
    after = rendezvous(rest, session)
    if gone is not first:
        assert after[0] == first
    # Failover order is consistent too: removing a node just deletes it from the order.
    assert after == [n for n in rendezvous(nodes, session) if n is not gone]


@settings(max_examples=100, deadline=None)
@given(node_lists(min_size=2), st.text(max_size=16))
def test_rendezvous_adding_a_node_moves_sessions_only_to_it(
    nodes: list[Node], session: str
) -> None:
    *old, new = nodes
    before = rendezvous(old, session)[0]
    after = rendezvous(nodes, session)[0]
    assert after in (before, new)


def test_rendezvous_spreads_sessions_by_weight() -> None:
    nodes = [Node("a:1", weight=3.0), Node("b:1", weight=1.0)]
    sessions = 4000
    firsts = collections.Counter(rendezvous(nodes, f"s{i}")[0].key for i in range(sessions))
    assert 0.72 < firsts["a:1"] / sessions < 0.78  # expected 0.75


def test_rendezvous_spreads_sessions_evenly() -> None:
    nodes = _ring(4)
    sessions = 4000
    firsts = collections.Counter(rendezvous(nodes, f"user-{i}")[0].key for i in range(sessions))
    assert len(firsts) == 4
    for count in firsts.values():
        assert 0.21 < count / sessions < 0.29


def test_rendezvous_removal_moves_about_one_nth() -> None:
    nodes = _ring(5)
    sessions = [f"s{i}" for i in range(2000)]
    before = {s: rendezvous(nodes, s)[0].key for s in sessions}
    after = {s: rendezvous(nodes[:-1], s)[0].key for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert all(before[s] == nodes[-1].key for s in moved)
    assert 0.15 < len(moved) / len(sessions) < 0.25


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ROUND_ROBIN", Strategy.ROUND_ROBIN),
        ("round_robin", Strategy.ROUND_ROBIN),
        ("Round-Robin", Strategy.ROUND_ROBIN),
        (" random ", Strategy.RANDOM),
        ("RANDOM", Strategy.RANDOM),
        ("least_loaded", Strategy.LEAST_LOADED),
        ("Least_Loaded", Strategy.LEAST_LOADED),
    ],
)
def test_parse_strategy(text: str, expected: Strategy) -> None:
    assert parse_strategy(text) is expected


@pytest.mark.parametrize("text", ["", "fastest", "roundrobin", "least"])
def test_parse_strategy_rejects_unknown_naming_valid_values(text: str) -> None:
    with pytest.raises(ValueError, match="ROUND_ROBIN") as info:
        parse_strategy(text)
    assert "RANDOM" in str(info.value) and "LEAST_LOADED" in str(info.value)


def test_strategies_table_lists_every_strategy() -> None:
    assert set(STRATEGIES.values()) == set(Strategy)
    assert set(STRATEGIES) == {"ROUND_ROBIN", "RANDOM", "LEAST_LOADED"}
