"""Read-only views of the fleet: models, nodes, eligible nodes and the node-aware `/health`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import trio

from lb.api.admin import require_admin_if_set
from lb.cluster.node import Node
from lb.cluster.registry import Registry
from lb.errors import BadRequest, ModelNotFound
from lb.http.routes import Router
from lb.http.types import Request, Response
from lb.obs.nodes import NodeCounters
from lb.routing.eligibility import blocked

CREATED = 1700000000  # OpenAI's list shape needs a timestamp; the node's own is not shared


def model_param(request: Request) -> str:
    """The `model` query parameter, which these views require."""
    model = request.query_params().get("model")
    if not model:
        raise BadRequest("Query parameter 'model' is required", code="missing_parameter",
                         param="model")
    return model


def _model_entry(model: str, registry: Registry) -> dict[str, object]:
    return {
        "id": model,
        "object": "model",
        "created": CREATED,
        "owned_by": "lb",
        "nodes": [node.key for node in registry.serving(model)],
    }


def _alias_entry(alias: str, target: str, registry: Registry) -> dict[str, object]:
    return {**_model_entry(target, registry), "id": alias, "alias_of": target}


def _gone_entry(model: str, since: float, now: float, grace: float) -> dict[str, object]:
    """A model no healthy node serves right now, still listed for `grace` seconds."""
    return {
        "id": model,
        "object": "model",
        "created": CREATED,
        "owned_by": "lb",
        "nodes": [],
        "available": False,
        "unavailable_for_secs": round(now - since, 1),
        "listed_for_secs": round(since + grace - now, 1),
    }


def add_routes(
    router: Router,
    registry: Registry,
    min_healthy: int,
    fleet_status: Callable[[], dict[str, object]] | None = None,
    admin_key: str = "",
    model_grace: float = 600.0,
    counters: NodeCounters | None = None,
    aliases: Mapping[str, str] | None = None,
    alias_only: bool = False,
) -> None:
    counted = counters or NodeCounters()
    aliases = aliases or {}

    def describe(node: Node, now: float) -> dict[str, object]:
        key = node.key
        return {
            **node.describe(now, registry.fleet_cap(node)),
            "requests": counted.requests[key],
            "failures": counted.failures[key],
        }

    def gone() -> dict[str, dict[str, object]]:
        now = trio.current_time()
        return {
            model: _gone_entry(model, since, now, model_grace)
            for model, since in registry.gone_models(now, model_grace).items()
        }

    async def list_models(request: Request) -> Response:
        data = [] if alias_only else [
            _model_entry(m, registry) for m in registry.models() if "*" not in m  # no patterns
        ]
        # An alias is listed while its model is served: a handle that leads nowhere is a 404.
        data += [
            _alias_entry(alias, target, registry) for alias, target in aliases.items()
            if registry.serving(target)
        ]
        if not alias_only:
            data += sorted(gone().values(), key=lambda entry: str(entry["id"]))
        return Response.json({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        model = request.path_params["model"]
        if model in aliases and registry.serving(aliases[model]):
            return Response.json(_alias_entry(model, aliases[model], registry))
        if registry.serving(model):
            return Response.json(_model_entry(model, registry))
        entry = gone().get(model)
        if entry is None:
            raise ModelNotFound(f"The model '{model}' does not exist")
        return Response.json(entry)

    async def list_nodes(request: Request) -> Response:
        require_admin_if_set(request, admin_key)
        now = trio.current_time()
        nodes = [describe(node, now) for node in registry.nodes.values()]
        return Response.json({"nodes": nodes, "unavailable_models": gone()})

    async def eligible_nodes(request: Request) -> Response:
        require_admin_if_set(request, admin_key)
        model = model_param(request)
        now = trio.current_time()
        nodes = [
            describe(node, now) for node in registry.serving(model)
            if blocked(node, now) is None
        ]
        return Response.json({"model": model, "nodes": nodes})

    async def health(request: Request) -> Response:
        found = len(registry.healthy_nodes())
        ok = found >= min_healthy
        body: dict[str, object] = {
            "status": "ok" if ok else "unhealthy",
            "nodes_found": found,
            "minimum_required": min_healthy,
        }
        if fleet_status is not None:  # a Redis outage degrades, it does not fail /health
            body.update(fleet_status())
        return Response.json(body, status=200 if ok else 503)

    router.add("GET", "/v1/models", list_models)
    router.add("GET", "/v1/models/{model:path}", get_model)
    router.add("GET", "/v1/nodes", list_nodes)
    router.add("GET", "/v1/eligible_nodes", eligible_nodes)
    router.add("GET", "/health", health)
