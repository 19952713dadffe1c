"""Capacity grants in the fleet's sync script, on a real redis-server: instances sync one at a
time with any demand, and what they may admit never adds up to more than the cap, while an idle
instance's part goes to one that is short."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import orjson
import pytest
import trio
from harness import CHAT, RedisServer, start_mock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fleet import MODEL, fleet_pair

from lb.cluster.fleet import share
from lb.cluster.redis_store import RedisStore

NODE = "gpu:8000"
IDS = ("a", "b", "c")


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as redis_server:
        yield redis_server


class Instance:
    """What an lb instance does with its grants: admit up to its limit, ask, apply."""

    def __init__(self, store: RedisStore, name: str, cap: int) -> None:
        self.store, self.name, self.cap = store, name, cap
        self.limit = 0  # held nothing before the first grant (Fleet.join)
        self.inflight = 0
        self.waiting = 0

    async def sync(self, live: tuple[str, ...]) -> None:
        base = share(self.cap, live, self.name, NODE) or 0
        demand = {NODE: [self.cap, base, self.inflight, self.inflight + self.waiting, self.limit]}
        result = await self.store.sync(self.name, 5.0, {}, orjson.dumps(demand))
        self.admit()  # the worst case: requests come before the new limit is applied
        self.limit = result.grants[NODE]
        self.admit()

    def admit(self) -> None:
        admitted = min(self.waiting, max(0, self.limit - self.inflight))
        self.inflight += admitted
        self.waiting -= admitted


async def fleet(server: RedisServer, cap: int) -> tuple[RedisStore, list[Instance]]:
    store = RedisStore(server.url, f"lbgrants:{uuid.uuid4().hex[:8]}:")
    return store, [Instance(store, name, cap) for name in IDS]


steps = st.lists(
    st.tuples(st.sampled_from(range(len(IDS))), st.integers(0, 6), st.integers(0, 6)),
    min_size=1, max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cap=st.integers(1, 8), steps=steps)
def test_grants_never_exceed_the_cap(server: RedisServer, cap: int, steps: list[
    tuple[int, int, int]
]) -> None:
    async def run() -> None:
        store, instances = await fleet(server, cap)
        for who, finished, arrived in steps:
            me = instances[who]
            me.inflight -= min(finished, me.inflight)  # answers done since its last sync
            me.waiting += arrived
            await me.sync(IDS)
            assert sum(i.inflight for i in instances) <= cap
            assert sum(i.limit for i in instances) <= cap, [i.limit for i in instances]
        store.close()

    trio.run(run)


def test_an_idle_instance_lends_its_part_and_gets_it_back(server: RedisServer) -> None:
    async def run() -> None:
        store, (a, b, _) = await fleet(server, 4)
        live = ("a", "b")
        for _ in range(2):
            await a.sync(live)
            await b.sync(live)
        assert (a.limit, b.limit) == (2, 2)  # base shares while idle
        a.waiting = 4  # a is short, b idle: b gives back, a takes all
        for _ in range(3):
            await a.sync(live)
            await b.sync(live)
        assert (a.limit, b.limit, a.inflight) == (4, 0, 4)
        b.waiting = 3  # now b is short: a gives back as its requests end
        await b.sync(live)
        assert b.limit == 0  # nothing is free yet: a's four are in flight
        await a.sync(live)
        assert a.limit == 4  # never below what it has in flight
        a.inflight = 0  # they finished; a, idle, keeps nothing while b is short
        for _ in range(2):
            await a.sync(live)
            await b.sync(live)
        assert (a.limit, b.limit, b.inflight) == (0, 3, 3)
        store.close()

    trio.run(run)


async def test_a_request_waits_no_longer_than_a_free_slot_elsewhere(
    nursery: trio.Nursery, server: RedisServer
) -> None:
    """maxconn 2 over two instances (1 + 1): two long requests to the first one are both
    served at once, with the idle instance's slot, well before QUEUE_TIMEOUT_SECS; with
    static shares the second would wait the whole timeout and get 429."""
    with trio.fail_after(60):
        slow = await start_mock(nursery, models=(MODEL,), ttft_ms=3000)
        options = {"default_maxconn": 2, "queue_timeout": 2, "scan_interval": 3600}
        lb1, _ = await fleet_pair(nursery, [slow], server, **options)
        statuses: list[int] = []

        async def chat() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                answer = await http.post(
                    f"{lb1.url}/v1/chat/completions", json={"model": MODEL, **CHAT}
                )
                statuses.append(answer.status_code)

        async with trio.open_nursery() as clients:
            clients.start_soon(chat)
            clients.start_soon(chat)
        stats = await slow.stats()
        assert statuses == [200, 200]
        assert stats["max_concurrent"] == 2  # both at once, never more
