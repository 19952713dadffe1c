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
    NEEDS_LATENCY,
    STRATEGIES,
    Strategy,
    cost_optimized,
    failover,
    latency_optimized,
    least_loaded,
    load_balanced,
    order,
    p2c,
    parse_strategy,
    price_of,
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
# Figures (seconds or prices) for some of the nodes: keys drawn from the same 10.0.0.x range.
figure_maps = st.dictionaries(
    st.integers(1, 60).map(lambda i: f"10.0.0.{i}:8000"),
    st.floats(0.0, 100.0, allow_nan=False),
    max_size=10,
)


# ------------------------------------------------------------------------ all strategies


@FAST
@given(node_lists(), counters, seeds, st.text(max_size=12), figure_maps, figure_maps)
def test_every_strategy_returns_a_new_permutation(
    nodes: list[Node], counter: int, seed: int, session: str,
    latency: dict[str, float], prices: dict[str, float],
) -> None:
    before = list(nodes)
    results = [
        round_robin(nodes, counter),
        random_order(nodes, random.Random(seed)),
        least_loaded(nodes, counter),
        rendezvous(nodes, session),
        p2c(nodes, counter, random.Random(seed)),
        failover(nodes),
        latency_optimized(nodes, counter, latency),
        load_balanced(nodes, counter, latency),
        cost_optimized(nodes, counter, prices),
        *(order(s, nodes, counter=counter, rng=random.Random(seed)) for s in Strategy),
        *(
            order(s, nodes, counter=counter, rng=random.Random(seed), latency=latency,
                  prices=prices)
            for s in Strategy
        ),
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
        ("p2c", Strategy.P2C),
        ("power of two", Strategy.P2C),
        ("weighted", Strategy.RANDOM),
        ("failover", Strategy.FAILOVER),
        ("latency_optimized", Strategy.LATENCY_OPTIMIZED),
        ("load_balanced", Strategy.LOAD_BALANCED),
        ("cost_optimized", Strategy.COST_OPTIMIZED),
        # LiteLLM's router strategies
        ("simple-shuffle", Strategy.RANDOM),
        ("least-busy", Strategy.LEAST_LOADED),
        ("latency-based-routing", Strategy.LATENCY_OPTIMIZED),
        ("cost-based-routing", Strategy.COST_OPTIMIZED),
        ("usage-based-routing", Strategy.LEAST_LOADED),
        ("Latency Based Routing", Strategy.LATENCY_OPTIMIZED),
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
    assert {s.value for s in Strategy} <= set(STRATEGIES)
    for name in STRATEGIES:  # every accepted name parses in the spellings users type
        assert parse_strategy(name.lower().replace("_", "-")) is STRATEGIES[name]


@FAST
@given(node_lists(), counters, seeds, st.text(min_size=1, max_size=12))
def test_a_session_outranks_every_strategy(
    nodes: list[Node], counter: int, seed: int, session: str
) -> None:
    for strategy in Strategy:
        got = order(strategy, nodes, counter=counter, rng=random.Random(seed), session=session,
                    latency={n.key: 1.0 for n in nodes}, prices={n.key: 1.0 for n in nodes})
        assert got == rendezvous(nodes, session)


def test_order_dispatches_the_new_strategies() -> None:
    nodes = [Node("a:1", inflight=5), Node("b:1", inflight=0), Node("c:1", inflight=3)]
    latency = {"a:1": 0.1, "b:1": 0.3}
    prices = {"c:1": 0.5}
    def run(strategy: Strategy, seed: int = 3) -> list[Node]:
        return order(strategy, nodes, counter=2, rng=random.Random(seed), latency=latency,
                     prices=prices)

    assert run(Strategy.P2C) == p2c(nodes, 2, random.Random(3))
    assert run(Strategy.FAILOVER) == nodes
    assert run(Strategy.LATENCY_OPTIMIZED) == latency_optimized(nodes, 2, latency)
    assert run(Strategy.LOAD_BALANCED) == load_balanced(nodes, 2, latency)
    assert run(Strategy.COST_OPTIMIZED) == cost_optimized(nodes, 2, prices)
    assert {Strategy.LATENCY_OPTIMIZED, Strategy.LOAD_BALANCED} == NEEDS_LATENCY


# ------------------------------------------------------------------------------ p2c


@FAST
@given(node_lists(min_size=2), counters, seeds)
def test_p2c_first_never_the_unique_most_loaded(nodes: list[Node], counter: int, seed: int) -> None:
    ref = ref_capacity(nodes)
    got = p2c(nodes, counter, random.Random(seed))
    loads = [load(n, ref) for n in got]
    first, rest = loads[0], loads[1:]
    assert first <= max(rest)  # it beat (or tied) the other node drawn
    assert rest == sorted(rest)  # the rest by load


def test_p2c_two_nodes_less_loaded_always_first() -> None:
    nodes = [Node("busy:1", inflight=4), Node("idle:1", inflight=0)]
    rng = random.Random(5)
    for _ in range(100):
        assert p2c(nodes, 0, rng)[0].key == "idle:1"


def test_p2c_spreads_over_equal_nodes_and_avoids_the_busiest() -> None:
    nodes = [Node(f"n{i}:1") for i in range(4)] + [Node("hot:1", inflight=50)]
    rng = random.Random(11)
    firsts = collections.Counter(p2c(nodes, i, rng)[0].key for i in range(2000))
    assert "hot:1" not in firsts
    for i in range(4):
        assert 0.2 < firsts[f"n{i}:1"] / 2000 < 0.3  # expected 0.25


# ------------------------------------------------------------------------------ failover


@FAST
@given(node_lists())
def test_failover_keeps_the_configuration_order(nodes: list[Node]) -> None:
    assert failover(nodes) == nodes
    assert order(Strategy.FAILOVER, nodes, counter=7, rng=random.Random(0)) == nodes


# ------------------------------------------------------------------------------ latency


@FAST
@given(node_lists(min_size=1), counters, figure_maps)
def test_latency_optimized_unknown_idle_then_fastest_then_unknown_busy(
    nodes: list[Node], counter: int, latency: dict[str, float]
) -> None:
    got = latency_optimized(nodes, counter, latency)
    if len(nodes) == 1:
        return
    groups = [
        0 if n.key not in latency and n.inflight == 0 else 1 if n.key in latency else 2
        for n in got
    ]
    assert groups == sorted(groups)
    figures = [latency[n.key] for n in got if n.key in latency]
    assert figures == sorted(figures)


def test_latency_optimized_prefers_the_fast_node_and_explores_new_ones() -> None:
    fast, slow, new = Node("fast:1", inflight=3), Node("slow:1"), Node("new:1")
    latency = {"fast:1": 0.05, "slow:1": 0.8}
    assert keys(latency_optimized([slow, fast], 0, latency)) == ["fast:1", "slow:1"]
    assert keys(latency_optimized([slow, fast, new], 0, latency)) == ["new:1", "fast:1", "slow:1"]
    busy_new = Node("new:1", inflight=1)  # being measured already: last
    assert keys(latency_optimized([busy_new, slow, fast], 0, latency))[-1] == "new:1"


@FAST
@given(node_lists(min_size=1), counters)
def test_latency_optimized_without_figures_rotates_idle_nodes(
    nodes: list[Node], start: int
) -> None:
    idle = [attrs.evolve(n, inflight=0) for n in nodes]
    firsts = [latency_optimized(idle, start + i, {})[0].key for i in range(len(idle))]
    assert sorted(firsts) == sorted(keys(idle))


# ------------------------------------------------------------------------------ load balanced


def lb_score(node: Node, ref: int, latency: dict[str, float], default: float) -> float:
    if node.weight <= 0:
        return float("inf")
    return (1 + load(node, ref)) * latency.get(node.key, default) / node.weight


@FAST
@given(node_lists(min_size=1), counters, figure_maps)
def test_load_balanced_is_sorted_by_its_formula(
    nodes: list[Node], counter: int, latency: dict[str, float]
) -> None:
    ref = ref_capacity(nodes)
    known = sorted(latency[n.key] for n in nodes if n.key in latency)
    default = known[len(known) // 2] if known else 1.0
    scores = [lb_score(n, ref, latency, default) for n in load_balanced(nodes, counter, latency)]
    assert scores == sorted(scores)


@FAST
@given(node_lists(min_size=1), counters)
def test_load_balanced_without_figures_is_weighted_least_loaded(
    nodes: list[Node], counter: int
) -> None:
    ref = ref_capacity(nodes)
    got = load_balanced(nodes, counter, None)
    scores = [(1 + load(n, ref)) / n.weight for n in got]
    assert scores == sorted(scores)


def test_load_balanced_trades_latency_for_load() -> None:
    latency = {"fast:1": 0.1, "slow:1": 0.2}
    fast, slow = Node("fast:1", inflight=0, capacity=4), Node("slow:1", inflight=0, capacity=4)
    assert load_balanced([slow, fast], 0, latency)[0].key == "fast:1"
    # (1 + 4/4) * 0.1 = 0.2 vs (1 + 1/4) * 0.2 = 0.25: still the fast one
    fast = attrs.evolve(fast, inflight=4)
    slow = attrs.evolve(slow, inflight=1)
    assert load_balanced([slow, fast], 0, latency)[0].key == "fast:1"
    # (1 + 4/4) * 0.1 = 0.2 vs (1 + 0/4) * 0.15 = 0.15: now the slow, idle one
    latency = {"fast:1": 0.1, "slow:1": 0.15}
    slow = attrs.evolve(slow, inflight=0)
    assert load_balanced([slow, fast], 0, latency)[0].key == "slow:1"


# ------------------------------------------------------------------------------ cost


@FAST
@given(node_lists(min_size=1), counters, figure_maps)
def test_cost_optimized_cheapest_first_unpriced_last(
    nodes: list[Node], counter: int, prices: dict[str, float]
) -> None:
    got = cost_optimized(nodes, counter, prices)
    ref = ref_capacity(nodes)
    priced = [n for n in got if n.key in prices]
    assert got[: len(priced)] == priced  # every priced node before every unpriced one
    assert [(prices[n.key], load(n, ref)) for n in priced] == sorted(
        (prices[n.key], load(n, ref)) for n in priced
    )
    unpriced = [load(n, ref) for n in got[len(priced):]]
    assert unpriced == sorted(unpriced)


@FAST
@given(node_lists(), counters)
def test_cost_optimized_without_prices_is_least_loaded(nodes: list[Node], counter: int) -> None:
    assert cost_optimized(nodes, counter, {}) == least_loaded(nodes, counter)
    assert cost_optimized(nodes, counter, None) == least_loaded(nodes, counter)


@pytest.mark.parametrize(
    ("labels", "price"),
    [
        ({}, None),
        ({"rack": "a"}, None),
        ({"price": "0.5"}, 0.5),
        ({"price_in": "1e-6", "price_out": "2e-6"}, 3e-6),
        ({"price_out": "2"}, 2.0),
        ({"price": "0.1", "price_in": "9"}, 0.1),
        ({"price": "cheap"}, None),
        ({"price": "-1"}, None),
        ({"price": "nan"}, None),
    ],
)
def test_price_of_labels(labels: dict[str, str], price: float | None) -> None:
    assert price_of(labels) == price
