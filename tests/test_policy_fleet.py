"""Keys across a fleet of two lb instances sharing a private redis-server: limits exact
fleet-wide, spend and revocations shared, and Redis killed mid-run (per-instance shares)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import trio
from harness import CHAT, RedisServer, Running, start_mock
from test_fleet import SCAN, SYNC, fleet_pair, prefix
from test_policy import keyed_lb

MASTER = "sk-fleet-master"
ADMIN = {"authorization": f"Bearer {MASTER}"}
MODEL = "llama-3.1-8b"


async def generate(lb: Running, **fields: Any) -> str:
    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{lb.url}/key/generate", headers=ADMIN, json=fields)
    assert answer.status_code == 200, answer.text
    key: str = answer.json()["key"]
    return key


async def statuses(lbs: list[Running], key: str, count: int) -> Counter[int]:
    """`count` chat requests at once, spread evenly over `lbs`: how many got each status."""
    got: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:

        async def one(lb: Running) -> None:
            answer = await http.post(f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT},
                                     headers={"authorization": f"Bearer {key}"})
            got[answer.status_code] += 1

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, lbs[i % len(lbs)])
    return got


async def test_two_instances_admit_exactly_the_limit(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(40):
        node = await start_mock(nursery, models=(MODEL,))
        a, b = await fleet_pair(nursery, [node], redis_server, master_key=MASTER)
        key = await generate(a, rpm_limit=60)
        assert await statuses([a, b], key, 100) == {200: 60, 429: 40}
        assert await node.chats() == 60
        # the other instance's view of the same key agrees: nothing left this minute
        assert await statuses([b], key, 3) == {429: 3}
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{a.url}/health")).json()
        assert health["redis"] == "up" and health["limits"] == "fleet"


async def test_spend_tokens_and_revocation_are_shared(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(40):
        node = await start_mock(nursery, models=(MODEL,), tokens=30)
        a, b = await fleet_pair(nursery, [node], redis_server, master_key=MASTER)
        key = await generate(a, tpm_limit=100, key_alias="shared")
        bearer = {"authorization": f"Bearer {key}"}
        async with httpx.AsyncClient() as http:
            first = await http.post(f"{a.url}/v1/chat/completions", headers=bearer,
                                    json={"model": MODEL, **CHAT})
            assert first.status_code == 200
            used = first.json()["usage"]["total_tokens"]
            second = await http.post(f"{b.url}/v1/chat/completions", headers=bearer,
                                     json={"model": MODEL, **CHAT})
            assert second.status_code == 200
            # both answers' real tokens are in the fleet's window (settled asynchronously)
            while True:
                third = await http.post(f"{b.url}/v1/chat/completions", headers=bearer,
                                        json={"model": MODEL, **CHAT})
                if third.status_code == 429:
                    break
                assert third.status_code == 200
            remaining = int(third.headers["x-ratelimit-remaining-tokens"])
            assert remaining <= 100 - 2 * used
            # spend logs from both instances are in the fleet's store
            while len((await http.get(f"{b.url}/spend/logs", headers=ADMIN)).json()) < 2:
                await trio.sleep(0.1)
            info = (await http.get(f"{a.url}/key/info", headers=ADMIN,
                                   params={"key": "shared"})).json()["info"]
            assert info["tpm_limit"] == 100
            await http.post(f"{a.url}/key/delete", headers=ADMIN, json={"keys": [key]})
            revoked = trio.current_time()
            while (await http.post(f"{b.url}/v1/chat/completions", headers=bearer,
                                   json={"model": MODEL, **CHAT})).status_code != 401:
                await trio.sleep(0.05)
            assert trio.current_time() - revoked < 1.0


async def test_redis_killed_mid_run_falls_back_to_a_share_per_instance(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(40):
        node = await start_mock(nursery, models=(MODEL,))
        a, b = await fleet_pair(nursery, [node], redis_server, master_key=MASTER)
        key = await generate(a, rpm_limit=10)
        async with httpx.AsyncClient() as http:
            while len((await http.get(f"{a.url}/health")).json()["instances"]) < 2:
                await trio.sleep(0.1)
        assert await statuses([a, b], key, 4) == {200: 4}  # the key is known to both now
        redis_server.stop()
        # each instance now allows 10 // 2 live instances = 5 a minute, on its own counters
        assert await statuses([a], key, 8) == {200: 5, 429: 3}
        assert await statuses([b], key, 8) == {200: 5, 429: 3}
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{a.url}/health")).json()
            assert health["redis"] == "down" or health["limits"] == "local"
            while (await http.get(f"{a.url}/health")).json()["redis"] != "down":
                await trio.sleep(0.1)
            # an unknown key cannot be checked without the store: 503, never 500
            answer = await http.post(f"{a.url}/v1/chat/completions", json={"model": MODEL, **CHAT},
                                     headers={"authorization": "Bearer sk-never-seen"})
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "key_store_unavailable"
            # the master key needs no store
            answer = await http.post(f"{b.url}/v1/chat/completions", json={"model": MODEL, **CHAT},
                                     headers=ADMIN)
            assert answer.status_code == 200


async def test_a_budget_spent_on_one_instance_is_refused_by_the_other(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(40):
        node = await start_mock(nursery, models=(MODEL,), tokens=10)
        fleet = {"redis_url": redis_server.url, "redis_prefix": prefix(),
                 "redis_sync_secs": SYNC, "scan_interval": SCAN}
        a, b = [await keyed_lb(nursery, [node], {"price": "0.01"}, master_key=MASTER, **fleet)
                for _ in range(2)]
        key = await generate(a, max_budget=0.05, models=[MODEL])
        bearer = {"authorization": f"Bearer {key}"}
        body = {"model": MODEL, **CHAT}
        async with httpx.AsyncClient() as http:
            # b reads the key, with nothing spent, and spends nothing itself (403); twice, the
            # second after b has seen the key's creation (which clears its cache)
            for _ in range(2):
                assert (await http.post(f"{b.url}/v1/chat/completions", headers=bearer,
                                        json={**body, "model": "other"})).status_code == 403
                await trio.sleep(0.6)
            assert (await http.post(f"{a.url}/v1/chat/completions", headers=bearer,
                                    json=body)).status_code == 200
            # a flushes within a second; b re-reads its cached keys every second
            await trio.sleep(2.5)
            answer = await http.post(f"{b.url}/v1/chat/completions", headers=bearer, json=body)
            assert answer.status_code == 402
            info = (await http.get(f"{b.url}/key/info", headers=ADMIN,
                                   params={"key": key})).json()["info"]
            assert info["spend"] > 0.05
