"""Debug views: why each node is or is not eligible for a model, and the background services."""

from __future__ import annotations

from collections.abc import Mapping

import trio

from lb.api.nodes import model_param
from lb.cluster.node import Node
from lb.cluster.registry import Registry
from lb.cluster.scanner import ScanState
from lb.http.routes import Router
from lb.http.types import Request, Response
from lb.supervise import ServiceStats

DOWN = "down"
DRAINING = "draining"
MODEL_MISSING = "model_missing"
BREAKER_OPEN = "breaker_open"
AT_CAPACITY = "at_capacity"
ELIGIBLE = "eligible"


def eligibility(node: Node, model: str, now: float) -> str:
    """Why `node` would or would not take a request for `model` now (the first reason found)."""
    if not node.healthy:
        return DOWN
    if node.draining:
        return DRAINING
    if model not in node.models:
        return MODEL_MISSING
    if not node.breaker.allows(now):
        return BREAKER_OPEN
    if node.is_full():
        return AT_CAPACITY
    return ELIGIBLE


def add_routes(
    router: Router,
    registry: Registry,
    services: Mapping[str, ServiceStats],
    scan: ScanState,
) -> None:
    async def eligible(request: Request) -> Response:
        model = model_param(request)
        now = trio.current_time()
        nodes = [
            {"node": node.key, "url": node.url, "reason": eligibility(node, model, now)}
            for node in registry.nodes.values()
        ]
        return Response.json({
            "model": model,
            "eligible": [entry["node"] for entry in nodes if entry["reason"] == ELIGIBLE],
            "nodes": nodes,
        })

    async def list_services(request: Request) -> Response:
        body = {
            "services": {
                name: {"crashes": stats.crashes, "last_error": stats.last_error}
                for name, stats in services.items()
            },
            "scanner": scan.describe(),
        }
        return Response.json(body)

    router.add("GET", "/v1/debug/eligible", eligible)
    router.add("GET", "/v1/debug/services", list_services)
