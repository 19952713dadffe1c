"""`GET /metrics`: Prometheus' text exposition of lb's counters and its nodes' live state.

Open by default; with `LB_METRICS_KEY` set, `Authorization: Bearer <key>` is required (401)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from lb.api.admin import check_bearer
from lb.http.routes import Router
from lb.http.types import Request, Response
from lb.obs.metrics import MetricsCollector

CONTENT_TYPE = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")


def add_routes(router: Router, collector: MetricsCollector, metrics_key: str = "") -> None:
    exposition = CollectorRegistry(auto_describe=False)
    exposition.register(collector)

    async def scrape(request: Request) -> Response:
        if metrics_key:
            check_bearer(request, metrics_key, "metrics key", "LB_METRICS_KEY")
        return Response(200, [CONTENT_TYPE], generate_latest(exposition))

    router.add("GET", "/metrics", scrape)
