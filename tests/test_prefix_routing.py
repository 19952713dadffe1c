"""PREFIX_AWARE end to end: three mock nodes, lb on real sockets, the official SDK."""

from __future__ import annotations

from typing import Any

import trio
from harness import Running, RunningMock, start_lb, start_mock
from harness import sdk as sdk_for

MODEL = "llama-3.1-8b"
SYSTEM = "You are a careful assistant. " * 20  # longer than one 256-byte block


async def _ask(lb: Running, messages: list[dict[str, Any]], **extra: Any) -> tuple[str, str]:
    """(the node that answered, the answer's text)."""
    raw = await sdk_for(lb).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, **extra  # type: ignore[arg-type]
    )
    answer = raw.parse()
    return raw.headers["x-routed-node"], answer.choices[0].message.content or ""


async def _conversation(lb: Running, system: str, name: str, turns: int) -> list[str]:
    """Where each turn of a conversation went, each turn carrying the ones before."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    routed = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"{name}: question {turn}"})
        node, text = await _ask(lb, messages)
        routed.append(node)
        messages.append({"role": "assistant", "content": text})
    return routed


async def _three(nursery: trio.Nursery) -> tuple[list[RunningMock], Running]:
    nodes = [await start_mock(nursery, models=(MODEL,)) for _ in range(3)]
    lb = await start_lb(nursery, [*nodes], routing_strategy="PREFIX_AWARE", scan_interval=60)
    return nodes, lb


async def test_multi_turn_conversations_stick_to_one_node(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        _, lb = await _three(nursery)
        for name in ("alice", "bob", "carol", "dave"):
            routed = await _conversation(lb, SYSTEM, name, 5)
            assert len(set(routed)) == 1, routed
        # Short system prompts too (a message always starts a new block).
        for name in ("erin", "frank"):
            routed = await _conversation(lb, f"Be brief, {name}.", name, 4)
            assert len(set(routed)) == 1, routed


async def test_distinct_system_prompts_spread(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        nodes, lb = await _three(nursery)
        first = [
            (await _conversation(lb, f"System prompt number {i}: {SYSTEM}", "x", 1))[0]
            for i in range(30)
        ]
        assert set(first) == {node.key for node in nodes}
        # The same prompts again go where they went (the index remembers them).
        again = [
            (await _conversation(lb, f"System prompt number {i}: {SYSTEM}", "x", 1))[0]
            for i in range(30)
        ]
        assert again == first


async def test_cache_aware_chosen_per_request(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        nodes = [await start_mock(nursery, models=(MODEL,)) for _ in range(3)]
        lb = await start_lb(nursery, [*nodes], scan_interval=60)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
        routed = {
            (await _ask(lb, messages, extra_headers={"x-lb-strategy": "cache_aware"}))[0]
            for _ in range(6)
        }
        assert len(routed) == 1


async def _hold(lb: Running, node: str, i: int) -> None:
    """A slow request forced onto `node` (held open for 2 s)."""
    await _ask(
        lb, [{"role": "user", "content": f"slow {i}"}],
        extra_headers={"x-mock-fault": "ttft-ms=2000"}, extra_query={"node": node},
    )


async def test_a_busy_node_is_avoided_by_bounded_load(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        nodes, lb = await _three(nursery)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": "first"},
        ]
        owner, _ = await _ask(lb, messages)
        assert (await _ask(lb, messages))[0] == owner
        busy = next(node for node in nodes if node.key == owner)
        before = await busy.chats()
        held = 4
        async with trio.open_nursery() as holders:
            for i in range(held):
                holders.start_soon(_hold, lb, owner, i)
            while await busy.chats() < before + held:
                await trio.sleep(0.02)
            moved, _ = await _ask(lb, messages)
            assert moved != owner
        # A spill leaves the prefix with its owner: once free again, it gets it back.
        assert (await _ask(lb, messages))[0] == owner
