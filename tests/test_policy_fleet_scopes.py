"""The operator's rate limits (`LB_RATE_LIMITS`) across a fleet of two lb instances sharing a
private redis-server: exact fleet-wide, in the same script call as a key's limits (all or
nothing), with keys on or off; Redis killed: each instance its share."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis
import trio
import trio.testing
from harness import CHAT, RedisServer, Running, start_mock
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fleet import fleet_pair
from test_policy_fleet import generate

from lb.policy.counters import Figures, KeyCounters, Limits, Ticket
from lb.policy.fleet import _ADMIT, FleetLimits, _Call

MASTER = "sk-fleet-master"
MODEL = "llama-3.1-8b"
ADMIT_SHA = hashlib.sha1(_ADMIT.encode()).hexdigest()


def sdk(lb: Running, key: str = "no-key-needed") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{lb.url}/v1", api_key=key, max_retries=0)


async def chat(lb: Running, key: str = "no-key-needed", model: str = MODEL) -> Any:
    """One chat request through the official client: its raw answer (200) or the error."""
    try:
        return await sdk(lb, key).chat.completions.with_raw_response.create(
            model=model, **CHAT
        )
    except openai.RateLimitError as refused:
        return refused


async def spread(
    load: list[tuple[Running, int]], key: str = "no-key-needed"
) -> tuple[Counter[int], list[openai.RateLimitError]]:
    """All of `load` (so many requests to each instance) at once: statuses and refusals."""
    got: Counter[int] = Counter()
    refusals: list[openai.RateLimitError] = []

    async def one(lb: Running) -> None:
        answer = await chat(lb, key)
        if isinstance(answer, openai.RateLimitError):
            refusals.append(answer)
        got[answer.status_code] += 1

    async with trio.open_nursery() as nursery:
        for lb, count in load:
            for _ in range(count):
                nursery.start_soon(one, lb)
    return got, refusals


async def health(lb: Running) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        answer: dict[str, Any] = (await http.get(f"{lb.url}/health")).json()
    return answer


async def both_live(a: Running) -> None:
    """Until each instance counts two live instances (so a share would be limit / 2)."""
    while len((await health(a))["instances"]) < 2:
        await trio.sleep(0.1)


def admit_calls(server: RedisServer) -> int:
    """Calls of the admission script since the slow log was reset (it logs every command)."""
    client = redis.Redis.from_url(server.url)
    try:
        return sum(entry["command"].startswith(f"EVALSHA {ADMIT_SHA}".encode())
                   for entry in client.slowlog_get(100_000))
    finally:
        client.close()


def log_every_command(server: RedisServer) -> None:
    """From now on the slow log keeps every command; the admission script is loaded already
    (else an instance's first EVALSHA misses, and is sent again)."""
    client = redis.Redis.from_url(server.url)
    try:
        client.script_load(_ADMIT)
        client.config_set("slowlog-log-slower-than", 0)
        client.config_set("slowlog-max-len", 100_000)
        client.slowlog_reset()
    finally:
        client.close()


async def test_a_models_limit_is_exact_fleet_wide_without_keys(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(40):
        node = await start_mock(nursery, models=(MODEL,))
        a, b = await fleet_pair(nursery, [node], redis_server, master_key="",
                                rate_limits={MODEL: Limits(rpm=60)})
        await both_live(a)
        log_every_command(redis_server)
        # uneven: per-instance shares (30 each) would admit 30 + 20 = 50
        got, refusals = await spread([(a, 80), (b, 20)])
        assert got == {200: 60, 429: 40}
        assert await node.chats() == 60
        assert admit_calls(redis_server) == 100  # one script call per request, nothing more
        for refused in refusals:
            assert f"model {MODEL}: 60 requests per minute" in refused.message
            headers = refused.response.headers
            assert headers["x-ratelimit-limit-requests"] == "60"
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert 0 < float(headers["retry-after"]) <= 60
        assert (await health(b))["limits"] == "fleet"


async def test_a_scopes_tokens_settle_with_the_real_usage_fleet_wide(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(40):
        node = await start_mock(nursery, models=(MODEL,), tokens=30)
        a, b = await fleet_pair(nursery, [node], redis_server, master_key="",
                                rate_limits={"*": Limits(tpm=100)})
        first = await chat(a)
        used = first.parse().usage.total_tokens
        assert used > 30 and (await chat(b)).status_code == 200
        # both answers' real tokens replace their estimates in the fleet's window (settled
        # in the background): the window fills up sooner than the estimates alone would
        while True:
            answer = await chat(b)
            if isinstance(answer, openai.RateLimitError):
                break
        assert "all requests: 100 tokens per minute" in answer.message
        assert int(answer.response.headers["x-ratelimit-remaining-tokens"]) <= 100 - 2 * used


async def test_a_refusal_by_the_scope_or_the_key_takes_nothing_from_the_other(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(40):
        node = await start_mock(nursery, models=(MODEL, "other", "third"))
        limits = {MODEL: Limits(rpm=4), "third": Limits(rpm=2), "*": Limits(rpm=10)}
        a, b = await fleet_pair(nursery, [node], redis_server, master_key=MASTER,
                                rate_limits=limits)
        key = await generate(a, rpm_limit=3)
        log_every_command(redis_server)
        for lb in (a, b, a, b):  # the model's limit, shared by every key
            assert (await chat(lb, MASTER)).status_code == 200
        # the model refuses the key: nothing taken from the key's window
        refused = await chat(b, key)
        assert isinstance(refused, openai.RateLimitError)
        assert f"model {MODEL}: 4 requests per minute" in refused.message
        assert refused.response.headers["x-ratelimit-limit-requests"] == "4"
        for lb, left in ((a, "2"), (b, "1"), (a, "0")):  # the key's 3, counted fleet-wide
            answer = await chat(lb, key, "other")
            assert answer.headers["x-ratelimit-remaining-requests"] == left
        refused = await chat(b, key, "other")
        assert isinstance(refused, openai.RateLimitError)
        assert "this key: 3 requests per minute" in refused.message
        # the key refuses: nothing taken from the model's limit (nor from all requests')
        refused = await chat(a, key, "third")
        assert isinstance(refused, openai.RateLimitError)
        assert "this key" in refused.message
        assert (await chat(b, MASTER, "third")).status_code == 200
        assert (await chat(a, MASTER, "third")).status_code == 200
        refused = await chat(b, MASTER, "third")
        assert isinstance(refused, openai.RateLimitError)
        assert "model third: 2 requests per minute" in refused.message
        # admitted so far: 4 + 3 + 2 = 9 of all requests' 10; the refusals took none
        assert (await chat(b, MASTER, "other")).status_code == 200
        refused = await chat(a, MASTER, "other")
        assert isinstance(refused, openai.RateLimitError)
        assert "all requests: 10 requests per minute" in refused.message
        assert await node.chats() == 10
        assert admit_calls(redis_server) == 15  # one call per request, key and scopes alike


async def test_redis_killed_the_scopes_fall_back_to_a_share_per_instance(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    with trio.fail_after(40):
        node = await start_mock(nursery, models=(MODEL,))
        a, b = await fleet_pair(nursery, [node], redis_server, master_key="",
                                rate_limits={"*": Limits(rpm=10)})
        await both_live(a)
        assert (await spread([(a, 2), (b, 2)]))[0] == {200: 4}
        redis_server.stop()
        # each instance now allows 10 // 2 live instances = 5 a minute, on its own counters
        for lb in (a, b):
            got, refusals = await spread([(lb, 8)])
            assert got == {200: 5, 429: 3}
            assert all(r.response.headers["x-ratelimit-limit-requests"] == "5"
                       for r in refusals)
        status = await health(a)
        assert status["limits"] == "local" or status["redis"] == "down"



# --- the script's decision, against the pure reference (counters.KeyCounters) ---------------

limits_of_a_group = st.builds(
    Limits,
    rpm=st.none() | st.integers(1, 6),
    tpm=st.none() | st.integers(1, 200),
    burst=st.none() | st.integers(1, 4),
    parallel=st.none() | st.integers(1, 3),
)
operations = st.lists(
    st.one_of(
        # admit a request of `estimate` tokens that must fit these groups (in this order)
        st.tuples(st.just("admit"), st.lists(st.integers(0, 2), min_size=1, max_size=3,
                                             unique=True), st.integers(1, 80)),
        # one of the requests held ends, with these real tokens (None: unknown)
        st.tuples(st.just("settle"), st.integers(0, 1000), st.none() | st.integers(0, 150)),
    ),
    max_size=30,
)


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@settings(max_examples=60, deadline=None)
@given(st.lists(limits_of_a_group, min_size=3, max_size=3), operations)
async def test_one_call_decides_as_the_counters_do_all_or_nothing(
    shared_redis: RedisServer, groups: list[Limits],
    steps: list[tuple[str, Any, Any]],
) -> None:
    """Within a minute (no window expires; the buckets refill by less than one request):
    the script admits exactly when every group's counters would, refuses naming the first
    group that would not, takes nothing from any group then, and reports the same
    remaining requests and tokens."""
    fleet = FleetLimits(shared_redis.url, f"lbtest:{uuid.uuid4().hex[:8]}:", lambda: 1)
    reference = [KeyCounters() for _ in groups]
    for counters, limits in zip(reference, groups, strict=True):
        counters.configure(limits, 0.0)
    held: list[list[tuple[int, Ticket, Ticket]]] = []
    try:
        for step in steps:
            if step[0] == "settle":
                if not held:
                    continue
                for i, expected, got in held.pop(step[1] % len(held)):
                    reference[i].settle(expected, step[2], 0.0)
                    fleet.settle(fleet.scope_group(f"g{i}"), got, step[2])
                await fleet.send_settled()
                continue
            _, chosen, estimate = step
            refused = None
            for position, i in enumerate(chosen):
                refusal = reference[i].check(0.0, estimate)
                if refusal is not None:
                    refused = (position, refusal)
                    break
            result = await fleet.admit(
                [(fleet.scope_group(f"g{i}"), groups[i]) for i in chosen], estimate
            )
            if refused is not None:
                assert isinstance(result, tuple) and result[0] == refused[0]
                assert remaining(result[1].figures) == remaining(refused[1].figures)
                continue
            assert isinstance(result, list)
            tickets = [reference[i].take(0.0, estimate) for i in chosen]
            for expected, got in zip(tickets, result, strict=True):
                assert remaining(got.figures) == remaining(expected.figures)
            held.append(list(zip(chosen, tickets, result, strict=True)))
    finally:
        fleet.close()


def remaining(figures: Figures) -> tuple[int, int]:
    return figures.remaining_requests, figures.remaining_tokens


async def test_concurrent_admissions_batched_exact_through_cancels_and_a_script_flush(
    shared_redis: RedisServer,
) -> None:
    """80 admissions at once for a limit of 50, ten of them cancelled while they wait: every
    other one is answered (none stranded behind a cancelled one), and the fleet counted
    exactly 50 — after Redis lost its scripts (as after a restart)."""
    prefix = f"lbtest:{uuid.uuid4().hex[:8]}:"
    fleet = FleetLimits(shared_redis.url, prefix, lambda: 1)
    client = redis.Redis.from_url(shared_redis.url)
    try:
        client.script_flush()
        group = [(fleet.scope_group("*"), Limits(rpm=50))]
        answers: dict[int, object] = {}

        async def admit(i: int, scope: trio.CancelScope) -> None:
            with scope:
                answers[i] = await fleet.admit(group, 1)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                scopes = [trio.CancelScope() for _ in range(80)]
                for i, scope in enumerate(scopes):
                    nursery.start_soon(admit, i, scope)
                # the first one's call is in flight, the others wait for the next batch
                await trio.testing.wait_all_tasks_blocked()
                for scope in scopes[40:50]:
                    scope.cancel()
        # (a cancelled one may have been sending the batch: then it finishes, answered)
        assert set(answers) >= set(range(40)) | set(range(50, 80))
        assert sum(isinstance(a, list) for a in answers.values()) <= 50
        assert all(a is not None for a in answers.values())
        assert client.zcard(f"{prefix}rls:*:req") == 50
        # a batch of several finds the script gone: loaded again, each call sent once more
        client.script_flush()
        replies = await trio.to_thread.run_sync(fleet._pipeline, [
            _Call([f"{prefix}rls:x:{n}" for n in ("req", "tok", "tokw", "tokt", "burst", "par")],
                  [f"t:{i}", 1, 1000, 2, 0, 0, 0]) for i in range(3)
        ])
        assert [reply[0] for reply in replies] == [1, 1, 0]
    finally:
        client.close()
        fleet.close()
