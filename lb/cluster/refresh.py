"""Reads every node's `GET /v1/models` at start and every SCAN_INTERVAL seconds.

A node that answers is healthy with the models it lists; one that does not is marked down and
leaves routing until it answers again. Probes go through httpx: this is not the hot path.
"""

from __future__ import annotations

import logging

import httpx
import trio

from lb.cluster.node import Node
from lb.cluster.registry import Registry

log = logging.getLogger("lb.refresh")

MAX_CONCURRENT_PROBES = 32


async def fetch_models(client: httpx.AsyncClient, node: Node) -> tuple[str, ...]:
    response = await client.get(f"{node.url}/v1/models")
    response.raise_for_status()
    data = response.json().get("data")
    if not isinstance(data, list):
        raise ValueError("/v1/models answer has no 'data' list")
    return tuple(str(item["id"]) for item in data if isinstance(item, dict) and "id" in item)


async def probe(registry: Registry, client: httpx.AsyncClient, node: Node) -> None:
    try:
        models = await fetch_models(client, node)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        if node.healthy:
            log.warning("node %s is down: %s", node.key, exc or type(exc).__name__)
        node.last_error = f"probe: {exc or type(exc).__name__}"
        registry.update(node, healthy=False)
        return
    if not node.healthy:
        log.info("node %s is up with %d model(s)", node.key, len(models))
    registry.update(node, models=models, healthy=True)


async def refresh_once(registry: Registry, client: httpx.AsyncClient) -> None:
    limiter = trio.CapacityLimiter(MAX_CONCURRENT_PROBES)

    async def bounded(node: Node) -> None:
        async with limiter:
            await probe(registry, client, node)

    async with trio.open_nursery() as nursery:
        for node in list(registry.nodes.values()):
            nursery.start_soon(bounded, node)


async def refresh_forever(registry: Registry, interval: float, probe_timeout: float) -> None:
    async with httpx.AsyncClient(timeout=probe_timeout) as client:
        while True:
            await trio.sleep(interval)
            await refresh_once(registry, client)


async def refresh_at_start(registry: Registry, probe_timeout: float) -> None:
    async with httpx.AsyncClient(timeout=probe_timeout) as client:
        await refresh_once(registry, client)
