"""What a request costs: (model, node) -> USD per input and per output token.

Today a node's YAML labels carry its prices (`price_in`/`price_out`, or `price` for both, as
COST_OPTIMIZED reads them); the provider catalogue's `input_cost_per_token` /
`output_cost_per_token` will feed the same lookup. Pure apart from the lookup it is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

# (model, node key) -> (USD per prompt token, USD per completion token), None: unknown (free)
Prices = Callable[[str, str], tuple[float, float] | None]


def from_labels(labels: Mapping[str, str]) -> tuple[float, float] | None:
    """A node's prices from its labels; None when it has none or one is not a number >= 0."""
    try:
        if "price_in" in labels or "price_out" in labels:
            pair = float(labels.get("price_in", 0)), float(labels.get("price_out", 0))
        elif "price" in labels:
            pair = (float(labels["price"]),) * 2
        else:
            return None
    except ValueError:
        return None
    return pair if all(math.isfinite(p) and p >= 0 for p in pair) else None


def node_label_prices(labels_of: Callable[[str], Mapping[str, str] | None]) -> Prices:
    """Prices read from the labels of the node that served (`labels_of(node key)`)."""

    parsed: dict[str, tuple[Mapping[str, str], tuple[float, float] | None]] = {}

    def prices(model: str, node: str) -> tuple[float, float] | None:
        labels = labels_of(node)
        if labels is None:
            return None
        known = parsed.get(node)
        if known is None or known[0] is not labels:  # parsed once per node's labels
            known = parsed[node] = (labels, from_labels(labels))
        return known[1]

    return prices


def cost(prices: tuple[float, float] | None, prompt: int, completion: int) -> float:
    if prices is None:
        return 0.0
    return prompt * prices[0] + completion * prices[1]
