"""Debug views: why each node is or is not eligible for a model, and the background services."""

from __future__ import annotations

import os
from collections.abc import Mapping

import trio

from lb.api.admin import require_admin_if_set
from lb.api.nodes import model_param
from lb.cluster.registry import Registry
from lb.cluster.scanner import ScanState
from lb.http.routes import Router
from lb.http.types import Request, Response
from lb.routing.eligibility import Reason, eligibility
from lb.supervise import ServiceStats


def add_routes(
    router: Router,
    registry: Registry,
    services: Mapping[str, ServiceStats],
    scan: ScanState,
    admin_key: str = "",
    worker: Mapping[str, object] | None = None,
) -> None:
    async def eligible(request: Request) -> Response:
        require_admin_if_set(request, admin_key)
        model = model_param(request)
        now = trio.current_time()
        nodes = [
            {"node": node.key, "url": node.url, "reason": eligibility(node, model, now)}
            for node in registry.nodes.values()
        ]
        return Response.json({
            "model": model,
            "eligible": [entry["node"] for entry in nodes if entry["reason"] == Reason.ELIGIBLE],
            "nodes": nodes,
        })

    async def list_services(request: Request) -> Response:
        require_admin_if_set(request, admin_key)
        body = {
            "services": {
                name: {"crashes": stats.crashes, "last_error": stats.last_error}
                for name, stats in services.items()
            },
            "scanner": scan.describe(),
            # Which process answered: with --workers N, also which worker and its restarts.
            "process": {"pid": os.getpid(), **(worker or {})},
        }
        return Response.json(body)

    router.add("GET", "/v1/debug/eligible", eligible)
    router.add("GET", "/v1/debug/services", list_services)
