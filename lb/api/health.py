"""Liveness and readiness: `/health/liveliness`, `/health/readiness` and `/healthz`."""

from __future__ import annotations

from collections.abc import Callable

from lb.http.routes import Router
from lb.http.types import Request, Response


def add_routes(router: Router, is_draining: Callable[[], bool]) -> None:
    async def liveliness(request: Request) -> Response:
        return Response.json({"status": "alive"})

    async def readiness(request: Request) -> Response:
        if is_draining():
            return Response.json({"status": "draining"}, status=503)
        return Response.json({"status": "ready"})

    router.add("GET", "/health/liveliness", liveliness)
    router.add("GET", "/health/liveness", liveliness)
    router.add("GET", "/health/readiness", readiness)
    router.add("GET", "/healthz", readiness)
