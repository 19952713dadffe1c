"""Several lb instances sharing one real Redis (a private redis-server on a free port)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import redis
import trio
from harness import CHAT, RedisServer, Running, RunningMock, start_lb, start_mock, start_mock_on

MODEL = "llama-3.1-8b"
SCAN = 0.2  # scan interval of these tests
SYNC = 0.1  # fleet sync interval of these tests


async def fleet_lb(
    nursery: trio.Nursery, nodes: list[Running], server: RedisServer, prefix: str, **options: Any
) -> Running:
    settings: dict[str, Any] = {
        "redis_url": server.url, "redis_prefix": prefix, "redis_sync_secs": SYNC,
        "scan_interval": SCAN, "health_fail_threshold": 2, **options,
    }
    return await start_lb(nursery, nodes, **settings)


async def fleet_pair(
    nursery: trio.Nursery, nodes: Sequence[Running], server: RedisServer, **options: Any
) -> tuple[Running, Running]:
    """Two lb instances in front of the same nodes, sharing one fleet (a fresh key prefix)."""
    key = prefix()
    first = await fleet_lb(nursery, list(nodes), server, key, **options)
    return first, await fleet_lb(nursery, list(nodes), server, key, **options)


async def get(lb: Running, path: str, **kwargs: Any) -> Any:
    """GET as the admin (the views of the topology need the key on instances that have one)."""
    async with httpx.AsyncClient(headers={"authorization": "Bearer k"}) as client:
        return (await client.get(f"{lb.url}{path}", **kwargs)).json()


async def healthy_nodes(lb: Running) -> set[str]:
    return {n["node"] for n in (await get(lb, "/v1/nodes"))["nodes"] if n["healthy"]}


async def leaders(*lbs: Running) -> list[bool]:
    return [(await get(lb, "/health"))["leader"] for lb in lbs]


def prefix() -> str:
    return f"lbtest:{uuid.uuid4().hex[:8]}:"


async def test_two_instances_share_nodes_and_one_leader_probes(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(20):
        a = await start_mock(nursery, models=(MODEL,))
        b = await start_mock(nursery, models=(MODEL,))
        lb1, lb2 = await fleet_pair(nursery, [a, b], redis_server)
        assert await healthy_nodes(lb1) == await healthy_nodes(lb2) == {a.key, b.key}
        while sorted(await leaders(lb1, lb2)) != [False, True]:
            await trio.sleep(SYNC)
        health = await get(lb1, "/health")
        assert health["redis"] == "up" and len(health["instances"]) == 2
        # Over a while, the nodes are probed about once per interval, not once per instance.
        before = (await a.stats())["by_path"].get("/v1/models", 0)
        await trio.sleep(20 * SCAN)
        probes = (await a.stats())["by_path"].get("/v1/models", 0) - before
        assert 10 <= probes <= 25  # two probing instances would make about 40


async def test_a_dead_node_leaves_every_instance(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(20):
        a = await start_mock(nursery, models=(MODEL,))
        b = await start_mock(nursery, models=(MODEL,))
        lb1, lb2 = await fleet_pair(nursery, [a, b], redis_server)
        a.stop()
        # Both lose it; the follower from the leader's table (within a few intervals).
        with trio.fail_after(3 * SCAN + 10 * SYNC + 1):
            while a.key in await healthy_nodes(lb1) or a.key in await healthy_nodes(lb2):
                await trio.sleep(SYNC / 2)
        # It comes back on the same port: both see it again.
        await start_mock_on(nursery, a.port, models=(MODEL, "new-model"))
        while not all([
            "new-model" in [m["id"] for m in (await get(lb, "/v1/models"))["data"]]
            for lb in (lb1, lb2)
        ]):
            await trio.sleep(SYNC)


async def test_leader_killed_another_takes_over(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(20):
        a = await start_mock(nursery, models=(MODEL,))
        b = await start_mock(nursery, models=(MODEL,))
        lb1, lb2 = await fleet_pair(nursery, [a, b], redis_server)
        while sorted(await leaders(lb1, lb2)) != [False, True]:
            await trio.sleep(SYNC)
        leader, follower = (lb1, lb2) if (await leaders(lb1))[0] else (lb2, lb1)
        instance = (await get(leader, "/health"))["instance"]
        leader.stop()  # cancelled: it leaves at once, and its lease would expire anyway
        with trio.fail_after(2 * SCAN + 10 * SYNC + 2):
            while not (await get(follower, "/health"))["leader"]:
                await trio.sleep(SYNC)
        assert instance not in (await get(follower, "/health"))["instances"]
        b.stop()  # the new leader scans: the death is noticed
        while b.key in await healthy_nodes(follower):
            await trio.sleep(SYNC)


async def test_admin_change_reaches_every_instance(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(20):
        a = await start_mock(nursery, models=("qwen3-8b", "gemma3-270m"))
        lb1, lb2 = await fleet_pair(nursery, [a], redis_server, admin_key="s3cret")
        auth = {"authorization": "Bearer s3cret"}
        async with httpx.AsyncClient() as client:
            changed = await client.post(
                f"{lb1.url}/v1/admin/prefs", headers=auth,
                json={"preferred_models": ["gemma3-270m"], "maxconn": {a.key: 3}},
            )
            assert changed.status_code == 200 and changed.json()["shared"] is True
            with trio.fail_after(1):  # the bound: within one second
                while (await client.get(f"{lb2.url}/v1/admin/prefs", headers=auth)).json()[
                    "preferred_models"
                ] != ["gemma3-270m"]:
                    await trio.sleep(0.02)
                # The new cap holds nothing on lb2 until Redis grants it a part (its next
                # sync, at once); meanwhile a request without a queue wait is refused.
                while (answer := await client.post(
                    f"{lb2.url}/v1/chat/completions", json={"model": "auto", **CHAT}
                )).status_code == 429:
                    await trio.sleep(0.02)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == "gemma3-270m"
            nodes = (await client.get(f"{lb2.url}/v1/nodes", headers=auth)).json()["nodes"]
            assert nodes[0]["maxconn"] == 3


async def test_same_session_same_node_through_either_instance(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(20):
        mocks = [await start_mock(nursery, models=(MODEL,)) for _ in range(3)]
        lb1, lb2 = await fleet_pair(nursery, mocks, redis_server)
        async with httpx.AsyncClient() as client:
            for session in ("s1", "s2", "s3", "s4", "s5"):
                routed = set()
                for lb in (lb1, lb2, lb1, lb2):
                    answer = await client.post(
                        f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT},
                        headers={"x-session-id": session},
                    )
                    routed.add(answer.headers["x-routed-node"])
                assert len(routed) == 1


async def test_maxconn_holds_across_the_fleet(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(30):
        slow = await start_mock(nursery, models=(MODEL,), ttft_ms=150)
        # Scanned at start only: the mock counts probes as concurrent requests too.
        options = {"default_maxconn": 4, "queue_timeout": 20, "scan_interval": 3600}
        lb1, lb2 = await fleet_pair(nursery, [slow], redis_server, **options)
        failures: list[int] = []

        async def client(lb: Running) -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                for _ in range(3):
                    answer = await http.post(
                        f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT}
                    )
                    if answer.status_code != 200:
                        failures.append(answer.status_code)

        async with trio.open_nursery() as clients:
            for i in range(20):
                clients.start_soon(client, (lb1, lb2)[i % 2])
        stats = await slow.stats()
        assert failures == []
        assert stats["by_path"]["/v1/chat/completions"] == 60
        assert stats["max_concurrent"] <= 4, stats
        # Idle again, each instance holds its even share once the syncs after the load have
        # given back what was borrowed (a few syncs).
        with trio.fail_after(20 * SYNC):
            while sorted(
                [(await get(lb, "/v1/nodes"))["nodes"][0]["local_maxconn"] for lb in (lb1, lb2)]
            ) != [2, 2]:
                await trio.sleep(SYNC / 2)


async def test_breaker_opening_is_shared(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(20):
        a = await start_mock(nursery, models=(MODEL,))
        options = {"breaker_threshold": 2, "breaker_ttl": 30, "max_retries": 0}
        lb1, lb2 = await fleet_pair(nursery, [a], redis_server, **options)
        async with httpx.AsyncClient() as client:
            for _ in range(2):
                await client.post(
                    f"{lb1.url}/v1/chat/completions", json={"model": MODEL, **CHAT},
                    headers={"x-mock-fault": "status=500"},
                )
            while (await get(lb2, "/v1/nodes"))["nodes"][0]["breaker"] != "open":
                await trio.sleep(SYNC)
            answer = await client.post(
                f"{lb2.url}/v1/chat/completions", json={"model": MODEL, **CHAT}
            )
            assert answer.status_code == 503  # lb2 never saw it fail, yet keeps away


async def test_redis_outage_loses_no_request_and_resyncs(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(40):
        a = await start_mock(nursery, models=(MODEL,))
        b = await start_mock(nursery, models=(MODEL,))
        lb1, lb2 = await fleet_pair(nursery, [a, b], redis_server, admin_key="k")
        failures: list[str] = []
        done = 0
        stop = trio.Event()

        async def load(lb: Running) -> None:
            nonlocal done
            async with httpx.AsyncClient(timeout=10) as http:
                while not stop.is_set():
                    answer = await http.post(
                        f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT}
                    )
                    if answer.status_code != 200:
                        failures.append(answer.text)
                    done += 1

        async with trio.open_nursery() as clients:
            for lb in (lb1, lb2, lb1, lb2):
                clients.start_soon(load, lb)
            await trio.sleep(0.5)
            redis_server.stop()
            while (await get(lb1, "/health"))["redis"] != "down":
                await trio.sleep(SYNC)
            assert (await get(lb2, "/health"))["status"] == "ok"  # degraded, not failing
            during = done
            await trio.sleep(1.0)
            assert done > during  # still serving while Redis is away
            a.stop()  # each instance now scans for itself: the death is still noticed
            while a.key in await healthy_nodes(lb1) or a.key in await healthy_nodes(lb2):
                await trio.sleep(SYNC)
            redis_server.start()
            while not all([(await get(lb, "/health"))["redis"] == "up" for lb in (lb1, lb2)]):
                await trio.sleep(SYNC)
            await trio.sleep(0.5)
            stop.set()
        assert failures == []
        assert sorted(await leaders(lb1, lb2)) == [False, True]  # re-synced: one leader again
        async with httpx.AsyncClient() as client:
            await client.post(f"{lb2.url}/v1/admin/prefs", headers={"authorization": "Bearer k"},
                              json={"preferred_models": ["x"]})
            while (await client.get(f"{lb1.url}/v1/admin/prefs",
                                    headers={"authorization": "Bearer k"})).json()[
                "preferred_models"
            ] != ["x"]:
                await trio.sleep(SYNC)


def test_redis_keys_expire_with_their_owner(redis_server: RedisServer) -> None:
    """After every instance is gone, nothing it wrote outlives its TTL."""

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            a: RunningMock = await start_mock(nursery, models=(MODEL,))
            lb = await fleet_lb(nursery, [a], redis_server, "lbttl:", admin_key="k")
            async with httpx.AsyncClient() as client:
                await client.post(f"{lb.url}/v1/admin/prefs",
                                  headers={"authorization": "Bearer k"},
                                  json={"preferred_models": ["x"]})
            client_ = redis.Redis.from_url(redis_server.url, decode_responses=True)
            assert client_.keys("lbttl:*")
            ttls = {k: client_.pttl(k) for k in client_.keys("lbttl:*")}
            assert all(ttl > 0 for ttl in ttls.values()), ttls  # every key has a TTL
            nursery.cancel_scope.cancel()

    trio.run(run)
