"""`GET /api/routing/stats`: how routing went, per node and per model.

Counts and recent latencies come from the `RoutingStats` observer; each node's in-flight
requests, capacity, weight, breaker state and health are read from the registry when asked,
and so are the parts of each node's routing score (`score`: load, latency, price, weight,
blue/green group, prefix blocks owned; see `lb.api.ranking`).
A view of the topology: it needs the admin key once `LB_ADMIN_KEY` is set."""

from __future__ import annotations

import trio

from lb.api.admin import require_admin_if_set
from lb.api.ranking import score_parts
from lb.cluster.registry import Registry
from lb.http.routes import Router
from lb.http.types import Request, Response
from lb.obs.stats import RoutingStats
from lb.routing.dispatch import Dispatcher
from lb.routing.eligibility import blocked


def add_routes(
    router: Router,
    registry: Registry,
    stats: RoutingStats,
    *,
    strategy: str,
    admin_key: str = "",
    dispatcher: Dispatcher | None = None,
) -> None:
    async def routing_stats(request: Request) -> Response:
        require_admin_if_set(request, admin_key)
        now = trio.current_time()
        window = float(stats.window)
        nodes: dict[str, object] = {}
        # Measured among the nodes that may take requests now, as a strategy measures them.
        scores = {} if dispatcher is None else score_parts(
            dispatcher, [node for node in registry.nodes.values() if blocked(node, now) is None]
        )
        for node in registry.nodes.values():
            view = stats.node_view(node.key)
            nodes[node.key] = {
                "requests": view["requests"],
                "failures": view["failures"],
                "success_rate": view["success_rate"],
                "inflight": node.inflight,
                "capacity": node.capacity,
                "weight": node.weight,
                "breaker": node.breaker.state(now).value,
                "healthy": node.healthy,
                "latency_ms": view["latency_ms"],
                "tokens": view["tokens"],
                "score": scores.get(node.key),
            }
        served = registry.models()
        models = {
            model: stats.model_view(model)
            for model in sorted({*served, *stats.models})
        }
        return Response.json({
            "strategy": strategy,
            "window_secs": int(window) if window.is_integer() else window,
            "nodes": nodes,
            "models": models,
        })

    router.add("GET", "/api/routing/stats", routing_stats)
