"""The nodes this process routes to, and an index from model id to the healthy nodes serving it.

The index is rebuilt only when a node's models or health change, so the request path reads it
without any work proportional to the fleet's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import trio

from lb.cluster.node import Node
from lb.cluster.prefs import Prefs


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # built outside trio (tests, tools): no model has gone yet
        return 0.0


class Registry:
    def __init__(self, nodes: Iterable[Node] = (), prefs: Prefs | None = None) -> None:
        self.nodes: dict[str, Node] = {}
        self.prefs = prefs or Prefs()
        # Models no healthy node serves any more -> when the last one stopped (trio clock).
        self._gone: dict[str, float] = {}
        # Breakers this instance saw open since the fleet last synced: node -> open until.
        self._opened: dict[str, float] = {}
        self._by_model: dict[str, list[Node]] = {}
        self._counts: dict[str, int] = {}
        # Dispatch parks here while every eligible node is full; a released slot wakes it.
        self.slot_freed = trio.lowlevel.ParkingLot()
        # Requests parked for a slot, per node they wait for (a fleet asks for more for it).
        self.waiting: dict[str, int] = {}
        self.instances = 1  # the fleet's live instances, as last learnt (nodes' rpm/tpm shares)
        for node in nodes:
            self.nodes[node.key] = node
        self._reindex()

    def add(self, node: Node) -> None:
        self.nodes[node.key] = node
        node.capacity = self.fleet_cap(node)  # a fleet shrinks it to a share at its next sync
        if node.rate is not None:
            node.rate.share(self.instances)
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
        went_down = node.healthy and not healthy
        node.models = new_models
        node.healthy = healthy
        self._reindex(went_down)

    def _reindex(self, went_down: bool = False) -> None:
        """Rebuild the model index. Models that lose their last node because it went down are
        remembered as gone; a model a healthy node stopped listing is simply no more."""
        by_model: dict[str, list[Node]] = {}
        for node in self.nodes.values():
            if node.healthy:
                for model in node.models:
                    by_model.setdefault(model, []).append(node)
        counts = {model: len(nodes) for model, nodes in by_model.items()}
        if went_down:
            now = _now()
            for model in self._counts.keys() - counts.keys():
                self._gone[model] = now
        for model in counts.keys() & self._gone.keys():
            del self._gone[model]
        self._by_model = by_model
        self._counts = counts

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

    def gone_models(self, now: float, grace: float) -> dict[str, float]:
        """Models served until less than `grace` seconds ago, with when they went (a busy or
        restarting node's models stay known for a while: 503 and listed, not 404)."""
        for model in [m for m, since in self._gone.items() if now - since >= grace]:
            del self._gone[model]
        return dict(self._gone)

    def fleet_cap(self, node: Node) -> int:
        """The node's cap over the whole fleet: an admin override, else the configured one."""
        return self.prefs.maxconn.get(node.key, node.maxconn)

    def fleet_caps(self) -> dict[str, int]:
        return {key: self.fleet_cap(node) for key, node in self.nodes.items()}

    def set_prefs(self, prefs: Prefs) -> None:
        """New admin preferences; alone, this instance holds each node's whole cap (the fleet
        replaces that with shares at its next sync)."""
        self.prefs = prefs
        self.set_local_caps({key: cap or None for key, cap in self.fleet_caps().items()})

    def set_local_caps(self, caps: dict[str, int | None]) -> None:
        """This instance's limit per node: None for no cap, else that many (0 included)."""
        for key, cap in caps.items():
            node = self.nodes.get(key)
            limit = math.inf if cap is None else cap
            if node is not None and node.limiter.total_tokens != limit:
                node.limiter.total_tokens = limit
                self.slot_freed.unpark_all()

    def demand(self) -> dict[str, tuple[int, int, int, int]]:
        """Per node that has a cap: its fleet-wide cap, requests in flight from here, those
        plus the requests waiting here for it, and the local limit now in force."""
        out = {}
        for key, node in self.nodes.items():
            cap = self.fleet_cap(node)
            if cap:
                inflight = node.inflight
                limit = int(min(node.limiter.total_tokens, cap))
                out[key] = (cap, inflight, inflight + self.waiting.get(key, 0), limit)
        return out

    def add_waiting(self, keys: list[str], delta: int) -> None:
        for key in keys:
            count = self.waiting.get(key, 0) + delta
            if count:
                self.waiting[key] = count
            else:
                self.waiting.pop(key, None)

    def share_rates(self, instances: int) -> None:
        """A fleet of `instances`: each keeps 1/n of every node's own rpm/tpm."""
        self.instances = instances
        for node in self.nodes.values():
            if node.rate is not None:
                node.rate.share(instances)

    def breaker_opened(self, node: Node, until: float) -> None:
        self._opened[node.key] = until

    def take_opened_breakers(self, now: float) -> dict[str, float]:
        """Breakers opened here since the last call, as seconds they stay open."""
        opened, self._opened = self._opened, {}
        return {key: until - now for key, until in opened.items() if until > now}

    def release(self, node: Node, token: object) -> None:
        node.limiter.release_on_behalf_of(token)
        self.slot_freed.unpark_all()
