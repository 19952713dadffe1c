"""`/v1/debug/eligible`: every node with why it is or is not eligible for a model."""

from __future__ import annotations

from typing import Any

import httpx
import trio
from harness import CHAT, Running, start_lb, start_mock

from lb.cluster.node import Node
from lb.config import NodeConfig
from lb.routing.eligibility import eligibility

MODEL = "llama-3.1-8b"


def _node(**fields: Any) -> Node:
    node = Node.create(NodeConfig("http://a:1"), capacity=1, breaker_threshold=1, breaker_ttl=30)
    node.models = (MODEL,)
    node.healthy = True
    for name, value in fields.items():
        setattr(node, name, value)
    return node


def test_eligibility_reasons_in_order() -> None:
    assert eligibility(_node(), MODEL, 0) == "eligible"
    assert eligibility(_node(), "other", 0) == "model_missing"
    assert eligibility(_node(healthy=False), "other", 0) == "down"  # down comes first
    assert eligibility(_node(draining=True), MODEL, 0) == "draining"
    tripped = _node()
    tripped.breaker.record_failure(0)
    assert eligibility(tripped, MODEL, 1) == "breaker_open"
    assert eligibility(tripped, MODEL, 31) == "eligible"  # half-open: its probe may go
    full = _node()
    full.limiter.acquire_on_behalf_of_nowait(object())
    assert eligibility(full, MODEL, 0) == "at_capacity"


async def reasons(lb: Running, model: str) -> dict[str, str]:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{lb.url}/v1/debug/eligible", params={"model": model})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == model
    found = {node["node"]: node["reason"] for node in body["nodes"]}
    assert body["eligible"] == [key for key, reason in found.items() if reason == "eligible"]
    return found


async def test_eligible_reasons_end_to_end(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        a = await start_mock(nursery, models=(MODEL,))
        b = await start_mock(nursery, models=(MODEL, "qwen3-8b"))
        dead = await start_mock(nursery, models=(MODEL,))
        dead.stop()  # configured, never answered: listed, down
        lb = await start_lb(nursery, [a, b, dead], default_maxconn=1, breaker_threshold=1,
                            max_retries=0, scan_interval=3600)
        assert await reasons(lb, "qwen3-8b") == {
            a.key: "model_missing", b.key: "eligible", dead.key: "down"
        }
        assert await reasons(lb, MODEL) == {a.key: "eligible", b.key: "eligible",
                                            dead.key: "down"}
        async with httpx.AsyncClient() as client:
            failed = await client.post(
                f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT},
                params={"node": b.key}, headers={"x-mock-fault": "status=500"},
            )
            assert failed.status_code == 502
            assert await reasons(lb, MODEL) == {a.key: "eligible", b.key: "breaker_open",
                                                dead.key: "down"}

            async def hold() -> None:  # a request that waits on `a` until cancelled
                await client.post(
                    f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT},
                    params={"node": a.key}, headers={"x-mock-fault": "hang=1"}, timeout=None,
                )

            async with trio.open_nursery() as holding:
                holding.start_soon(hold)
                while (await a.stats())["concurrent"] == 0:
                    await trio.sleep(0.01)
                assert await reasons(lb, MODEL) == {a.key: "at_capacity", b.key: "breaker_open",
                                                    dead.key: "down"}
                holding.cancel_scope.cancel()
            while (await reasons(lb, MODEL))[a.key] != "eligible":  # the slot comes back
                await trio.sleep(0.01)


async def test_eligible_needs_a_model(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient() as client:
            for query in ("", "?model="):
                answer = await client.get(f"{lb.url}/v1/debug/eligible{query}")
                assert answer.status_code == 400
                error = answer.json()["error"]
                assert (error["code"], error["param"], error["type"]) == (
                    "missing_parameter", "model", "invalid_request_error"
                )
            services = (await client.get(f"{lb.url}/v1/debug/services")).json()
        assert services["services"] == {"scanner": {"crashes": 0, "last_error": ""}}
        assert services["scanner"]["targets"] == []  # a node is configured: no localhost scan
        assert services["scanner"]["scans"] >= 1  # the scan before listening
