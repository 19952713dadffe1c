"""Blue/green end to end: labelled mock nodes, lb on real sockets, the official SDK; the admin
endpoint; the ranking explained by /v1/debug/eligible and /api/routing/stats."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
import trio
from harness import CHAT, RedisServer, Running, _start, sdk, start_mock
from test_fleet import fleet_pair

from lb.app import serve
from lb.config import NodeConfig, Settings

MODEL = "llama-3.1-8b"
AUTH = {"authorization": "Bearer s3cret"}


async def start_labelled(
    nursery: trio.Nursery, nodes: list[tuple[Running, dict[str, str]]], **options: Any
) -> Running:
    """lb in front of `nodes`, each configured with its labels."""
    settings = Settings(
        host="127.0.0.1", port=0,
        nodes=tuple(NodeConfig(node.url, labels=labels) for node, labels in nodes), **options,
    )
    port, scope = await _start(
        nursery, lambda task_status: serve(settings, handle_signals=False, task_status=task_status)
    )
    return Running(port, scope)


async def blue_green(nursery: trio.Nursery, **options: Any) -> tuple[list[Running], Running]:
    """Two blue nodes, two green ones, one without the label (in that order)."""
    mocks = [await start_mock(nursery, models=(MODEL,), name=f"n{i}") for i in range(5)]
    labels = [{"version": "blue"}] * 2 + [{"version": "green"}] * 2 + [{}]
    lb = await start_labelled(nursery, list(zip(mocks, labels, strict=True)), **options)
    return mocks, lb


async def routed(lb: Running, count: int, headers: dict[str, str] | None = None) -> list[str]:
    client = sdk(lb)
    nodes = []
    for _ in range(count):
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, **CHAT, extra_headers=headers or {}
        )
        nodes.append(raw.headers["x-routed-node"])
    return nodes


async def test_the_split_sends_each_group_its_share(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        mocks, lb = await blue_green(nursery, traffic_split={"blue": 1.0, "green": 0.0})
        blue = {m.key for m in mocks[:2]}
        went = await routed(lb, 20)
        assert set(went) == blue  # green is drained, the unlabelled node is failover only
        assert min(Counter(went).values()) >= 5  # least loaded rotates inside the group


async def test_admin_changes_the_split_at_run_time(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        mocks, lb = await blue_green(nursery, admin_key="s3cret",
                                     traffic_split={"blue": 1.0, "green": 0.0})
        url = f"{lb.url}/v1/admin/traffic-split"
        async with httpx.AsyncClient(headers=AUTH) as client:
            seen = (await client.get(url)).json()
            assert seen == {"label": "version", "weights": {"blue": 1.0, "green": 0.0},
                            "version": 0}
            changed = await client.put(url, json={"weights": "blue=0,green=100"})
            assert changed.status_code == 200, changed.text
            assert changed.json() == {"label": "version", "weights": {"blue": 0.0, "green": 100.0},
                                      "version": 1, "shared": False}
            assert set(await routed(lb, 8)) == {m.key for m in mocks[2:4]}
            prefs = (await client.get(f"{lb.url}/v1/admin/prefs")).json()
            assert prefs["traffic_split"] == {"blue": 0.0, "green": 100.0}
            off = await client.put(url, json={"weights": None})
            assert off.json()["weights"] == {}
            assert len(set(await routed(lb, 15))) == 5  # no split: every node takes its turn


async def test_half_and_half_splits_a_session_free_stream_of_requests(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(30):
        mocks, lb = await blue_green(nursery, traffic_split={"blue": 1.0, "green": 1.0})
        went = Counter(await routed(lb, 120))
        blue = sum(went[m.key] for m in mocks[:2])
        green = sum(went[m.key] for m in mocks[2:4])
        assert blue + green == 120 and went[mocks[4].key] == 0
        # Binomial(120, 0.5): 30..90 is more than 5 standard deviations wide.
        assert 30 <= blue <= 90


async def test_a_session_keeps_to_one_group_and_node(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        _, lb = await blue_green(nursery, traffic_split={"blue": 1.0, "green": 1.0})
        for user in ("alice", "bob", "carol"):
            assert len(set(await routed(lb, 4, {"x-session-id": user}))) == 1


async def test_a_drained_group_is_failover_when_the_drawn_group_is_down(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(20):
        blue = await start_mock(nursery, models=(MODEL,))
        green = await start_mock(nursery, models=(MODEL,))
        lb = await start_labelled(
            nursery, [(blue, {"version": "blue"}), (green, {"version": "green"})],
            traffic_split={"blue": 1.0, "green": 0.0}, scan_interval=3600,
        )
        blue.stop()  # still healthy for lb (no probe until the next scan): the attempt fails
        client = sdk(lb)
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, **CHAT)
        assert raw.headers["x-routed-node"] == green.key
        assert raw.headers["x-attempts"] == "2"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"weights": {"blue": -1}}', "weight of 'blue'"),
        (b'{"weights": "blue"}', "label_value=weight"),
        (b'{"blue": 90}', "weights"),
        (b"[1]", "weights"),
    ],
)
async def test_a_bad_split_is_400_and_changes_nothing(
    nursery: trio.Nursery, body: bytes, named: str
) -> None:
    with trio.fail_after(10):
        _, lb = await blue_green(nursery, admin_key="s3cret", traffic_split={"blue": 1.0})
        url = f"{lb.url}/v1/admin/traffic-split"
        async with httpx.AsyncClient(headers=AUTH) as client:
            answer = await client.put(url, content=body)
            assert answer.status_code == 400
            assert answer.json()["error"]["type"] == "invalid_request_error"
            assert named in answer.json()["error"]["message"]
            assert (await client.get(url)).json()["weights"] == {"blue": 1.0}
        assert len(await routed(lb, 1)) == 1  # still serving


async def test_the_split_endpoint_needs_the_admin_key(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        _, lb = await blue_green(nursery, admin_key="s3cret")
        async with httpx.AsyncClient() as client:
            url = f"{lb.url}/v1/admin/traffic-split"
            assert (await client.get(url)).status_code == 401
            assert (await client.put(url, json={"weights": {}})).status_code == 401
        _, open_lb = await blue_green(nursery)
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"{open_lb.url}/v1/admin/traffic-split", headers=AUTH)
            assert answer.status_code == 403


# --- "why did my request go there" ---------------------------------------------------------


async def eligible(lb: Running, **params: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{lb.url}/v1/debug/eligible",
                                  params={"model": MODEL, **params})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


async def test_debug_eligible_ranks_the_nodes_with_their_score_parts(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(20):
        mocks, lb = await blue_green(nursery, traffic_split={"blue": 1.0, "green": 0.0})
        body = await eligible(lb)
        assert body["strategy"] == "LEAST_LOADED" and "load" in body["basis"]
        assert body["split"] == {"label": "version", "weights": {"blue": 1.0, "green": 0.0},
                                 "drawn": "blue"}
        ranking = body["ranking"]
        assert [entry["rank"] for entry in ranking] == [1, 2, 3, 4, 5]
        tiers = {entry["node"]: entry["tier"] for entry in ranking}
        assert tiers == {mocks[0].key: "chosen", mocks[1].key: "chosen",
                         mocks[2].key: "drained", mocks[3].key: "drained",
                         mocks[4].key: "failover"}
        assert [entry["tier"] for entry in ranking] == [
            "chosen", "chosen", "failover", "drained", "drained"]
        first = ranking[0]
        assert first["score"]["group"] == "blue" and first["score"]["load"] == 0
        assert "drawn" in first["why"] and "drained" in ranking[-1]["why"]
        # The existing fields stay, each node gains its rank and score.
        by_node = {entry["node"]: entry for entry in body["nodes"]}
        assert body["eligible"] == [m.key for m in mocks]
        assert by_node[first["node"]]["rank"] == 1
        assert by_node[first["node"]]["reason"] == "eligible"
        assert by_node[first["node"]]["score"] == first["score"]


async def test_debug_eligible_explains_a_chosen_strategy_and_leaves_blocked_nodes_unranked(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(20):
        a = await start_mock(nursery, models=(MODEL,))
        b = await start_mock(nursery, models=(MODEL,))
        dead = await start_mock(nursery, models=(MODEL,))
        dead.stop()
        lb = await start_labelled(nursery, [(a, {"price": "2"}), (b, {"price": "1"}),
                                            (dead, {})])
        body = await eligible(lb, strategy="cost-based-routing")
        assert body["strategy"] == "COST_OPTIMIZED"
        assert [e["node"] for e in body["ranking"]] == [b.key, a.key]
        assert body["ranking"][0]["score"]["price"] == 1.0
        assert "price 1" in body["ranking"][0]["why"]
        down = next(e for e in body["nodes"] if e["node"] == dead.key)
        assert down["reason"] == "down" and down["rank"] is None and down["score"] is None
        async with httpx.AsyncClient() as client:
            bad = await client.get(f"{lb.url}/v1/debug/eligible",
                                   params={"model": MODEL, "strategy": "fastest"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy"


async def test_debug_eligible_shows_a_requests_prefix_match(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        mocks = [await start_mock(nursery, models=(MODEL,)) for _ in range(3)]
        lb = await start_labelled(nursery, [(m, {}) for m in mocks],
                                  routing_strategy="PREFIX_AWARE")
        chat = {"model": MODEL, "messages": [
            {"role": "system", "content": "You are a careful assistant. " * 40},
            {"role": "user", "content": "first question"},
        ]}
        async with httpx.AsyncClient() as client:
            served = await client.post(f"{lb.url}/v1/chat/completions", json=chat)
            owner = served.headers["x-routed-node"]
            follow_up = {**chat, "messages": [*chat["messages"],
                                              {"role": "assistant", "content": "an answer"}]}
            answer = await client.post(f"{lb.url}/v1/debug/eligible", json=follow_up)
        assert answer.status_code == 200, answer.text
        ranking = answer.json()["ranking"]
        assert ranking[0]["node"] == owner
        assert ranking[0]["score"]["prefix"] == {"matched_blocks": 6, "owner": True}
        assert "owns" in ranking[0]["why"]
        assert all(e["score"]["prefix"]["matched_blocks"] == 0 for e in ranking[1:])


async def test_routing_stats_show_each_nodes_score_parts(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        mocks, lb = await blue_green(nursery)
        await routed(lb, 3)
        async with httpx.AsyncClient() as client:
            stats = (await client.get(f"{lb.url}/api/routing/stats")).json()
        score = stats["nodes"][mocks[0].key]["score"]
        assert score == {"load": 0.0, "inflight": 0, "capacity": 0, "latency_ms": None,
                         "price": None, "weight": 1.0, "group": "blue", "prefix_blocks": 0}
        assert stats["nodes"][mocks[4].key]["score"]["group"] is None


async def test_a_split_change_reaches_every_instance_of_a_fleet(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(20):
        a = await start_mock(nursery, models=(MODEL,))
        lb1, lb2 = await fleet_pair(nursery, [a], redis_server, admin_key="s3cret")
        async with httpx.AsyncClient(headers=AUTH) as client:
            changed = await client.put(f"{lb1.url}/v1/admin/traffic-split",
                                       json={"weights": {"blue": 90, "green": 10}})
            assert changed.status_code == 200 and changed.json()["shared"] is True
            with trio.fail_after(1):
                while (await client.get(f"{lb2.url}/v1/admin/traffic-split")).json()[
                    "weights"
                ] != {"blue": 90.0, "green": 10.0}:
                    await trio.sleep(0.02)
