"""The ranking a request would get now, explained: gathers the dispatcher's live inputs
(latency figures, prices, prefix index, traffic split, counter and RNG) for the pure
`lb.routing.explain`. Only the debug and stats endpoints call it: never the request path.

Reading changes nothing a request would notice: latency figures are read without starting
their recording, the prefix index is read without touching its LRU order; only the round-robin
counter and the RNG advance, as for one more request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import trio

from lb.cluster.node import Node
from lb.routing import prefix, strategies
from lb.routing.dispatch import Dispatcher, node_prices
from lb.routing.eligibility import blocked
from lb.routing.explain import BASIS, explain, parts
from lb.routing.resolve import ModelKind


def ranking(
    dispatcher: Dispatcher, nodes: Sequence[Node], strategy: strategies.Strategy, *,
    session: str | None = None, body: Mapping[str, Any] | None = None, kind: ModelKind = "chat",
) -> dict[str, Any]:
    """``{"strategy", "basis", "split", "ranking"}`` for a request over ``nodes`` (those that
    serve its model); nodes that take no request now (down, breaker open, ...) are left out,
    as planning leaves them out. ``body``: the request, for its prompt prefix."""
    now = trio.current_time()
    open_nodes = [node for node in nodes if blocked(node, now) is None]
    settings = dispatcher.settings
    latency = dispatcher.latency.figures((node.key for node in open_nodes), start=False)
    chain = prefix.blocks(body, kind, settings.prefix_aware_blocks) if body else ()
    hint = matched = None
    if chain:
        keys = {node.key for node in open_nodes}
        owner = dispatcher.prefixes.match(chain, keys)
        hint = strategies.PrefixHint(owner, chain[0], settings.prefix_aware_balance)
        matched = {k: v for k, v in dispatcher.prefixes.matched(chain).items() if k in keys}
    weights = dispatcher.registry.prefs.traffic_split
    split = dispatcher.split_for(weights, open_nodes, session) if weights else None
    counter, rng = dispatcher.draw()
    ranked = explain(
        strategy, open_nodes, counter=counter, rng=rng, session=session, latency=latency,
        prices=node_prices(open_nodes), prefix=hint, split=split, matched=matched,
    )
    return {
        "strategy": strategy.value,
        "basis": "sticky session (rendezvous hash)" if session else BASIS[strategy],
        "split": None if split is None else {
            "label": settings.traffic_split_label, "weights": dict(split.weights),
            "drawn": ranked[0]["score"]["group"] if ranked and ranked[0]["tier"] == "chosen"
            else None,
        },
        "ranking": ranked,
    }


def score_parts(dispatcher: Dispatcher, nodes: Sequence[Node]) -> dict[str, dict[str, Any]]:
    """Each node's score parts now (load, latency, price, weight, group, prefix blocks owned),
    measured among ``nodes``: for `/api/routing/stats`."""
    latency = dispatcher.latency.figures((node.key for node in nodes), start=False)
    prices = node_prices(nodes)
    label = dispatcher.settings.traffic_split_label
    owned = dispatcher.prefixes.counts() if len(dispatcher.prefixes) else {}
    result = {}
    for node in nodes:
        entry = parts(node, nodes, latency=latency, prices=prices,
                      group=node.config.labels.get(label))
        entry["prefix_blocks"] = owned.get(node.key, 0)
        result[node.key] = entry
    return result
