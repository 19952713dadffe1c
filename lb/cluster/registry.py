"""The nodes this process routes to, and an index from model id to the healthy nodes serving it.

The index is rebuilt only when a node's models or health change, so the request path reads it
without any work proportional to the fleet's size.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from lb.cluster.node import Node
from lb.routing.resolve import is_embedding_model


class Registry:
    def __init__(self, nodes: Iterable[Node] = ()) -> None:
        self.nodes: dict[str, Node] = {}
        self._by_model: dict[str, list[Node]] = {}
        self._counts: dict[str, int] = {}
        # Dispatch parks here while every eligible node is full; a released slot wakes it.
        self.slot_freed = trio.lowlevel.ParkingLot()
        for node in nodes:
            self.nodes[node.key] = node
        self._reindex()

    def add(self, node: Node) -> None:
        self.nodes[node.key] = node
        self._reindex()

    def remove(self, key: str) -> Node | None:
        node = self.nodes.pop(key, None)
        self._reindex()
        return node

    def update(self, node: Node, *, models: Iterable[str] | None = None, healthy: bool) -> None:
        """Set a node's models and health; reindex only if something changed."""
        new_models = node.models if models is None else tuple(models)
        if new_models == node.models and healthy == node.healthy:
            return
        node.models = new_models
        node.healthy = healthy
        self._reindex()

    def _reindex(self) -> None:
        by_model: dict[str, list[Node]] = {}
        for node in self.nodes.values():
            if node.healthy:
                for model in node.models:
                    by_model.setdefault(model, []).append(node)
        self._by_model = by_model
        self._counts = {model: len(nodes) for model, nodes in by_model.items()}

    def healthy_nodes(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.healthy]

    def serving(self, model: str) -> list[Node]:
        """Healthy nodes that serve `model`, in configuration order."""
        return self._by_model.get(model, [])

    def model_counts(self) -> dict[str, int]:
        """Every model a healthy node serves, with how many healthy nodes serve it."""
        return self._counts

    def models(self) -> list[str]:
        return sorted(self._counts)

    def model_kind(self, model: str) -> str:
        return "embedding" if is_embedding_model(model) else "chat"

    def release(self, node: Node, token: object) -> None:
        node.limiter.release_on_behalf_of(token)
        self.slot_freed.unpark_all()
