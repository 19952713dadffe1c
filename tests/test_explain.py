"""`explain` (pure): the same order as `strategies.order`, with each node's score parts."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from test_strategies import Node, node_lists

from lb.routing.explain import BASIS, explain
from lb.routing.split import Split
from lb.routing.strategies import PrefixHint, Strategy, order

FAST = settings(max_examples=50, deadline=None)


@FAST
@given(node_lists(min_size=1), st.sampled_from(list(Strategy)), st.integers(0, 50),
       st.none() | st.text(min_size=1, max_size=4), st.booleans())
def test_explain_ranks_as_order_does(
    nodes: list[Node], strategy: Strategy, counter: int, session: str | None, with_split: bool
) -> None:
    latency = {n.key: 0.01 * (i + 1) for i, n in enumerate(nodes) if i % 2}
    prices = {n.key: float(i) for i, n in enumerate(nodes) if i % 3}
    hint = PrefixHint(nodes[-1].key, b"\x01" * 8)
    split = Split({n.key: ("blue" if i % 2 else "green") for i, n in enumerate(nodes)},
                  {"blue": 3.0, "green": 1.0}, 0.4) if with_split else None
    inputs = {"counter": counter, "session": session, "latency": latency, "prices": prices,
              "prefix": hint, "split": split}
    expected = order(strategy, nodes, rng=random.Random(counter), **inputs)
    explained = explain(strategy, nodes, rng=random.Random(counter), **inputs)
    assert [e["node"] for e in explained] == [n.key for n in expected]
    assert [e["rank"] for e in explained] == list(range(1, len(nodes) + 1))
    for entry in explained:
        node = next(n for n in nodes if n.key == entry["node"])
        score = entry["score"]
        assert score["inflight"] == node.inflight and score["weight"] == node.weight
        assert score["latency_ms"] == (round(latency[node.key] * 1000, 3)
                                       if node.key in latency else None)
        assert score["price"] == prices.get(node.key)
        assert score["prefix"]["owner"] == (node.key == nodes[-1].key)
        assert entry["why"]
        assert entry["tier"] in ({"chosen", "failover", "drained"} if split else {"all"})


def test_every_strategy_has_a_basis() -> None:
    assert set(BASIS) == set(Strategy)


def test_load_balanced_why_shows_the_score() -> None:
    nodes = [Node("a:1", inflight=1, capacity=2), Node("b:1")]
    explained = explain(Strategy.LOAD_BALANCED, nodes, counter=0, rng=random.Random(0),
                        latency={"a:1": 0.1, "b:1": 0.3})
    assert explained[0]["node"] == "a:1"
    assert explained[0]["why"] == "(1 + 0.5) x 100.0 ms / 1 = 150.0"
    assert explained[0]["score"]["load"] == 0.5
