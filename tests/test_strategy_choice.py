"""Routing strategies end to end: three mock nodes, lb on real sockets, the official SDK."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import openai
import pytest
import trio
from harness import CHAT, Running, start_lb, start_mock
from harness import sdk as sdk_for

MODEL = "llama-3.1-8b"


async def _routed(
    lb: Running, count: int, stream: bool = False, extra_body: dict[str, Any] | None = None,
    strategy: str | None = None,
) -> list[str]:
    """Where `count` requests, one after the other, went (x-routed-node)."""
    client = sdk_for(lb)
    headers = {"x-lb-strategy": strategy} if strategy else {}
    nodes = []
    for _ in range(count):
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, stream=stream, **CHAT, extra_headers=headers, extra_body=extra_body
        )
        answer = raw.parse()
        if isinstance(answer, openai.AsyncStream):
            async for _chunk in answer:
                pass
        nodes.append(raw.headers["x-routed-node"])
    return nodes


async def test_failover_sends_everything_to_the_first_until_it_stops(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(20):
        a, b, c = [await start_mock(nursery, models=(MODEL,), name=n) for n in "abc"]
        lb = await start_lb(nursery, [a, b, c], routing_strategy="failover", scan_interval=60)
        assert await _routed(lb, 6) == [a.key] * 6
        a.stop()
        assert await _routed(lb, 6) == [b.key] * 6  # the next in line, not spread
        assert await c.chats() == 0


async def test_p2c_spreads(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        nodes = [await start_mock(nursery, models=(MODEL,)) for _ in range(3)]
        lb = await start_lb(nursery, [*nodes], routing_strategy="P2C")
        counts = Counter(await _routed(lb, 30))
        assert set(counts) == {node.key for node in nodes}


async def test_weighted_chosen_per_request_spreads(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        nodes = [await start_mock(nursery, models=(MODEL,)) for _ in range(3)]
        lb = await start_lb(nursery, [*nodes], routing_strategy="failover")
        counts = Counter(await _routed(lb, 30, strategy="simple-shuffle"))
        assert set(counts) == {node.key for node in nodes}
        assert await _routed(lb, 3) == [nodes[0].key] * 3  # without the header: lb's own


async def test_latency_optimized_prefers_the_fast_nodes(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        slow = await start_mock(nursery, models=(MODEL,), ttft_ms=300, name="slow")
        fast = [await start_mock(nursery, models=(MODEL,), name=f"fast{i}") for i in range(2)]
        lb = await start_lb(nursery, [slow, *fast], routing_strategy="latency-based-routing")
        routed = await _routed(lb, 8) + await _routed(lb, 8, stream=True)
        # Every node is measured once (the slow one too, while it is unknown); then only the
        # fast ones are chosen, streams (by their first token) as well as whole answers.
        assert routed.count(slow.key) == 1
        assert routed[3:].count(slow.key) == 0
        assert await slow.chats() == 1


async def test_latency_optimized_chosen_per_request_learns_a_fault(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(30):
        a, b, c = [await start_mock(nursery, models=(MODEL,), name=n) for n in "abc"]
        lb = await start_lb(nursery, [a, b, c], routing_strategy="round_robin")
        # Made slow only now, after lb saw it healthy (faults apply to its probes too).
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{b.url}/mock/fault", json={"fault": "ttft-ms=300"})
            answer.raise_for_status()
        routed = await _routed(lb, 10, strategy="LATENCY_OPTIMIZED")
        assert routed.count(b.key) == 1  # measured once, then avoided
        assert set(routed[3:]) <= {a.key, c.key}


async def test_strategy_body_field_is_removed_before_forwarding(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        nodes = [await start_mock(nursery, models=(MODEL,)) for _ in range(3)]
        lb = await start_lb(nursery, [*nodes], routing_strategy="round_robin")
        routed = await _routed(lb, 4, extra_body={"strategy": "failover"})
        assert routed == [nodes[0].key] * 4
        seen = await nodes[0].requests()
        bodies = [r["body"] for r in seen if r["path"] == "/v1/chat/completions"]
        assert len(bodies) == 4
        for body in bodies:
            assert "strategy" not in body
            assert body["model"] == MODEL and body["messages"] == CHAT["messages"]


@pytest.mark.parametrize(
    ("how", "name", "code"),
    [
        ("header", "p2c", "strategy_not_allowed"),
        ("header", "fastest", "invalid_strategy"),
        ("body", "least-busy", "strategy_not_allowed"),
        ("body", 7, "invalid_type"),
    ],
)
async def test_a_disallowed_or_unknown_strategy_is_400(
    nursery: trio.Nursery, how: str, name: Any, code: str
) -> None:
    with trio.fail_after(20):
        nodes = [await start_mock(nursery, models=(MODEL,)) for _ in range(2)]
        lb = await start_lb(
            nursery, [*nodes], routing_strategy="round_robin",
            allowed_strategies=("FAILOVER", "LATENCY_OPTIMIZED"),
        )
        client = sdk_for(lb)
        options: dict[str, Any] = (
            {"extra_headers": {"x-lb-strategy": name}} if how == "header"
            else {"extra_body": {"strategy": name}}
        )
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, **CHAT, **options)
        assert caught.value.code == code
        assert caught.value.param == ("x-lb-strategy" if how == "header" else "strategy")
        assert sum([await node.chats() for node in nodes]) == 0
        # The allowed ones, and lb's own ROUTING_STRATEGY, are served.
        for allowed in ("failover", "Latency-Optimized", "ROUND_ROBIN"):
            await client.chat.completions.create(
                model=MODEL, **CHAT, extra_headers={"x-lb-strategy": allowed}
            )
