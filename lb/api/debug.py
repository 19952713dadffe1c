"""Debug views: why each node is or is not eligible for a model and where it ranks (with the
parts of its score), and the background services."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import orjson
import trio

from lb.api.admin import AdminKey, require_admin_if_set
from lb.api.nodes import model_param
from lb.api.ranking import ranking
from lb.cluster.registry import Registry
from lb.cluster.scanner import ScanState
from lb.errors import BadRequest
from lb.http.routes import Router
from lb.http.types import Request, Response
from lb.routing import strategies
from lb.routing.dispatch import Dispatcher
from lb.routing.eligibility import Reason, eligibility
from lb.routing.resolve import ModelKind
from lb.supervise import ServiceStats


def add_routes(
    router: Router,
    registry: Registry,
    services: Mapping[str, ServiceStats],
    scan: ScanState,
    admin_key: AdminKey = "",
    dispatcher: Dispatcher | None = None,
    worker: Mapping[str, object] | None = None,
) -> None:
    async def eligible(request: Request) -> Response:
        """GET ``?model=&strategy=&session=``; or POST a chat/completion body (its model,
        ``strategy`` field and prompt prefix count; the query may name the strategy)."""
        require_admin_if_set(request, admin_key)
        query = request.query_params()
        body = _body(request) if request.method == "POST" else None
        if body is not None and isinstance(body.get("model"), str) and "model" not in query:
            model = body["model"]
        else:
            model = model_param(request)
        now = trio.current_time()
        nodes: list[dict[str, Any]] = [
            {"node": node.key, "url": node.url, "reason": eligibility(node, model, now)}
            for node in registry.nodes.values()
        ]
        result: dict[str, Any] = {
            "model": model,
            "eligible": [entry["node"] for entry in nodes if entry["reason"] == Reason.ELIGIBLE],
            "nodes": nodes,
        }
        if dispatcher is not None:
            name = query.get("strategy") or (body or {}).get("strategy")
            strategy = dispatcher.strategy
            if name:
                try:
                    strategy = strategies.parse_strategy(str(name))
                except ValueError as exc:
                    raise BadRequest(str(exc), code="invalid_strategy", param="strategy") from None
            session = query.get("session") or (request.header(b"x-session-id") or b"").decode(
                "latin-1") or None
            kind: ModelKind = "completion" if body is not None and "prompt" in body else "chat"
            explained = ranking(dispatcher, registry.serving(model), strategy, session=session,
                                body=body, kind=kind)
            by_node = {entry["node"]: entry for entry in explained["ranking"]}
            for entry in nodes:
                ranked = by_node.get(entry["node"])
                entry["rank"] = ranked["rank"] if ranked else None
                entry["why"] = ranked["why"] if ranked else None
                entry["score"] = ranked["score"] if ranked else None
            result.update(explained)
        return Response.json(result)

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
    router.add("POST", "/v1/debug/eligible", eligible)
    router.add("GET", "/v1/debug/services", list_services)


def _body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object", code="invalid_request")
    return body
