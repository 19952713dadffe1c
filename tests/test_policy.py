"""API keys end to end, over real sockets with the openai SDK: 401/403/402/429 with their headers,
revocation, expiry, spend = usage x price (streamed and not), the admin API and its auth."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import openai
import pytest
import trio
from harness import CHAT, Running, _start, start_mock

from lb.app import serve
from lb.config import ConfigError, NodeConfig, Settings, load_settings
from lb.policy.counters import parse_limits

MASTER = "sk-master-test"
ADMIN = {"authorization": f"Bearer {MASTER}"}
MODEL = "llama-3.1-8b"
PRICE_IN, PRICE_OUT = 0.001, 0.002  # USD per token, from the node's labels


async def keyed_lb(
    nursery: trio.Nursery, nodes: list[Running], labels: Mapping[str, str] | None = None,
    **options: Any,
) -> Running:
    """lb with keys on (an in-memory store unless told), its nodes carrying price labels."""
    settings = Settings(
        host="127.0.0.1", port=0,
        nodes=tuple(NodeConfig(n.url, labels=dict(labels or {})) for n in nodes),
        **{"master_key": MASTER, "data_dir": ":memory:", **options},
    )
    port, scope = await _start(
        nursery, lambda task_status: serve(settings, handle_signals=False, task_status=task_status)
    )
    return Running(port, scope)


def client(lb: Running, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{lb.url}/v1", api_key=key, max_retries=0)


async def generate(lb: Running, **fields: Any) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{lb.url}/key/generate", headers=ADMIN, json=fields)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


async def info(lb: Running, key: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{lb.url}/key/info", params={"key": key}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()["info"]
    return result


async def chat(lb: Running, key: str, model: str = MODEL, **extra: Any) -> Any:
    return await client(lb, key).chat.completions.create(model=model, **CHAT, **extra)


async def test_no_key_and_bad_keys_are_401_in_openai_shape(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await keyed_lb(nursery, [node])
        async with httpx.AsyncClient() as http:
            for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic x"},
                            {"x-api-key": MASTER}):  # x-api-key belongs to /v1/messages
                answer = await http.post(f"{lb.url}/v1/chat/completions", headers=headers,
                                         json={"model": MODEL, **CHAT})
                assert answer.status_code == 401
                error = answer.json()["error"]
                assert error["type"] == "authentication_error"
                assert error["code"] == "invalid_api_key"
                assert MASTER not in answer.text and "nope" not in answer.text
            # no key is refused before the body is even looked at
            answer = await http.post(f"{lb.url}/v1/chat/completions", content=b"{not json")
            assert answer.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            await chat(lb, "sk-wrong")
        assert (await chat(lb, MASTER)).choices[0].message.content
        assert await node.chats() == 1


async def test_the_master_key_opens_the_topology_and_admin_endpoints(
    nursery: trio.Nursery
) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await keyed_lb(nursery, [node], admin_key="admin-too")
        key = (await generate(lb))["key"]
        async with httpx.AsyncClient() as http:
            for path in ("/v1/nodes", "/v1/debug/services", "/v1/admin/prefs"):
                assert (await http.get(lb.url + path)).status_code == 401
                bearer = {"authorization": f"Bearer {key}"}
                assert (await http.get(lb.url + path, headers=bearer)).status_code == 401
                assert (await http.get(lb.url + path, headers=ADMIN)).status_code == 200
                other = {"authorization": "Bearer admin-too"}
                assert (await http.get(lb.url + path, headers=other)).status_code == 200
            nodes = (await http.get(f"{lb.url}/v1/nodes", headers=ADMIN)).text
            assert key not in nodes and MASTER not in nodes
            # key management is the master key's alone
            answer = await http.post(f"{lb.url}/key/generate", json={},
                                     headers={"authorization": f"Bearer {key}"})
            assert answer.status_code == 401


async def test_models_a_key_may_not_use_are_403(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL, "other"))
        lb = await keyed_lb(nursery, [node])
        created = await generate(lb, models=[MODEL], key_alias="alice")
        key = created["key"]
        assert created["models"] == [MODEL] and created["key_alias"] == "alice"
        assert created["token"] != key and key not in created["token"]
        assert (await chat(lb, key)).model == MODEL
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await chat(lb, key, "other")
        assert refused.value.status_code == 403
        assert refused.value.body["code"] == "model_not_allowed"  # type: ignore[index]
        with pytest.raises(openai.PermissionDeniedError):
            await chat(lb, key, "auto")  # a sentinel must be listed to be used
        assert await node.chats() == 1


async def test_requests_per_minute_are_429_with_openai_headers(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await keyed_lb(nursery, [node])
        key = (await generate(lb, rpm_limit=2, tpm_limit=10_000))["key"]
        raw = client(lb, key).chat.completions.with_raw_response
        first = await raw.create(model=MODEL, **CHAT)
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-limit-tokens"] == "10000"
        assert int(first.headers["x-ratelimit-remaining-tokens"]) < 10_000
        await raw.create(model=MODEL, **CHAT)
        with pytest.raises(openai.RateLimitError) as refused:
            await chat(lb, key)
        headers = refused.value.response.headers
        assert 55 <= int(headers["retry-after"]) <= 60
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        assert headers["x-ratelimit-limit-tokens"] == "10000"
        assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
        assert await node.chats() == 2
        # another key is not touched by this one's limit
        assert (await chat(lb, (await generate(lb, rpm_limit=1))["key"])).choices


async def test_tokens_per_minute_count_the_real_usage(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,), tokens=40)
        lb = await keyed_lb(nursery, [node])
        key = (await generate(lb, tpm_limit=60))["key"]
        # admitted on its estimate (~ body bytes / 4), then charged prompt + 40 completion
        await chat(lb, key)
        with pytest.raises(openai.RateLimitError) as refused:
            for _ in range(3):  # the first settles once its answer is out; allow for that
                await chat(lb, key)
                await trio.sleep(0.05)
        headers = refused.value.response.headers
        assert headers["x-ratelimit-limit-tokens"] == "60"
        assert int(headers["x-ratelimit-remaining-tokens"]) < 20
        assert "tokens per minute" in refused.value.message


async def test_parallel_requests_per_key(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,), ttft_ms=300)
        lb = await keyed_lb(nursery, [node])
        key = (await generate(lb, max_parallel_requests=1))["key"]
        results: list[str] = []

        async def one() -> None:
            try:
                await chat(lb, key)
                results.append("ok")
            except openai.RateLimitError:
                results.append("429")

        async with trio.open_nursery() as inner:
            inner.start_soon(one)
            await trio.sleep(0.1)
            inner.start_soon(one)
        assert sorted(results) == ["429", "ok"]
        await chat(lb, key)  # the slot came back


async def test_spend_is_usage_times_price_streamed_or_not(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        node = await start_mock(nursery, models=(MODEL,), tokens=7)
        prices = {"price_in": str(PRICE_IN), "price_out": str(PRICE_OUT)}
        lb = await keyed_lb(nursery, [node], prices)
        key = (await generate(lb))["key"]
        answer = await chat(lb, key)
        usage = answer.usage
        stream = await client(lb, key).chat.completions.create(
            model=MODEL, stream=True, stream_options={"include_usage": True}, **CHAT
        )
        streamed = None
        async for chunk in stream:
            streamed = chunk.usage or streamed
        assert usage is not None and streamed is not None
        expected = sum(u.prompt_tokens * PRICE_IN + u.completion_tokens * PRICE_OUT
                       for u in (usage, streamed))
        while (await info(lb, key))["spend"] < expected * 0.999:
            await trio.sleep(0.02)
        assert (await info(lb, key))["spend"] == pytest.approx(expected)
        async with httpx.AsyncClient() as http:
            logs = (await http.get(f"{lb.url}/spend/logs", headers=ADMIN,
                                   params={"api_key": key})).json()
            assert len(logs) == 2
            assert sum(log["spend"] for log in logs) == pytest.approx(expected)
            assert {log["model"] for log in logs} == {MODEL}
            assert all(log["node"] == node.key for log in logs)
            assert key not in str(logs)
            daily = (await http.get(f"{lb.url}/spend/daily", headers=ADMIN)).json()
            assert daily[0]["requests"] == 2 and daily[0]["spend"] == pytest.approx(expected)
            keys = (await http.get(f"{lb.url}/spend/keys", headers=ADMIN)).json()
            assert keys[0]["spend"] == pytest.approx(expected)
        # the key may read its own spend
        async with httpx.AsyncClient() as http:
            own = await http.get(f"{lb.url}/key/info", headers={"authorization": f"Bearer {key}"})
            assert own.json()["info"]["spend"] == pytest.approx(expected)


async def test_a_spent_budget_is_402(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,), tokens=10)
        lb = await keyed_lb(nursery, [node], {"price": "0.01"})
        key = (await generate(lb, max_budget=0.05, budget_duration="30d"))["key"]
        await chat(lb, key)  # ~ 12 tokens x 0.01 = 0.12: over budget once settled
        while (await info(lb, key))["spend"] == 0:
            await trio.sleep(0.02)
        with pytest.raises(openai.APIStatusError) as refused:
            await chat(lb, key)
        assert refused.value.status_code == 402
        assert refused.value.body["code"] == "budget_exceeded"  # type: ignore[index]
        assert refused.value.body["type"] == "insufficient_quota"  # type: ignore[index]
        assert await node.chats() == 1
        # raising the budget lets it through again
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{lb.url}/key/update", headers=ADMIN,
                                     json={"key": key, "max_budget": 100})
            assert answer.json()["max_budget"] == 100
        await chat(lb, key)


async def test_revocation_and_expiry(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await keyed_lb(nursery, [node])
        created = await generate(lb, key_alias="bob")
        key = created["key"]
        await chat(lb, key)
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{lb.url}/key/delete", headers=ADMIN,
                                     json={"key_aliases": ["bob"]})
            assert answer.json() == {"deleted_keys": [created["token"]]}
        with pytest.raises(openai.AuthenticationError):
            await chat(lb, key)
        short = (await generate(lb, duration="1s"))["key"]
        await chat(lb, short)
        await trio.sleep(1.05)
        with pytest.raises(openai.AuthenticationError) as expired:
            await chat(lb, short)
        assert expired.value.body["code"] == "expired_key"  # type: ignore[index]
        past = (await generate(lb, expires="2020-01-01T00:00:00Z"))["key"]
        with pytest.raises(openai.AuthenticationError):
            await chat(lb, past)


async def test_a_revocation_reaches_another_instance_within_a_second(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    """Two instances on one data folder: the second polls the store's version."""
    with trio.fail_after(20):
        node = await start_mock(nursery, models=(MODEL,))
        first = await keyed_lb(nursery, [node], data_dir=str(tmp_path))
        second = await keyed_lb(nursery, [node], data_dir=str(tmp_path))
        created = await generate(first)
        await chat(second, created["key"])  # cached there now
        async with httpx.AsyncClient() as http:
            await http.post(f"{first.url}/key/delete", headers=ADMIN,
                            json={"keys": [created["key"]]})
        revoked = trio.current_time()
        while True:
            try:
                await chat(second, created["key"])
            except openai.AuthenticationError:
                break
            await trio.sleep(0.05)
        assert trio.current_time() - revoked < 1.0


async def test_the_admin_api_checks_its_input(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await keyed_lb(nursery, [node])
        async with httpx.AsyncClient() as http:
            for body in ({"rpm_limit": 0}, {"rpm_limit": "ten"}, {"max_budget": -1},
                         {"budget_duration": "1y"}, {"models": "m"}, {"expires": "soon"},
                         {"colour": "red"}):
                answer = await http.post(f"{lb.url}/key/generate", headers=ADMIN, json=body)
                assert answer.status_code == 400, body
                assert answer.json()["error"]["code"] == "invalid_key_fields"
            answer = await http.post(f"{lb.url}/key/generate", headers=ADMIN, content=b"[")
            assert answer.status_code == 400
            answer = await http.post(f"{lb.url}/key/update", headers=ADMIN,
                                     json={"key": "sk-unknown", "rpm_limit": 3})
            assert answer.status_code == 404
            answer = await http.post(f"{lb.url}/key/delete", headers=ADMIN,
                                     json={"keys": ["sk-unknown"]})
            assert answer.status_code == 404
            await generate(lb, key_alias="dup")
            answer = await http.post(f"{lb.url}/key/generate", headers=ADMIN,
                                     json={"key_alias": "dup"})
            assert answer.status_code == 400
            listed = (await http.get(f"{lb.url}/key/list", headers=ADMIN)).json()
            assert listed["total_count"] == 1 and len(listed["keys"][0]) == 64
            full = (await http.get(f"{lb.url}/key/list", headers=ADMIN,
                                   params={"return_full_object": "true"})).json()
            assert full["keys"][0]["key_alias"] == "dup"
        assert (await chat(lb, MASTER)).choices  # lb kept serving


async def test_keys_off_the_admin_api_says_so(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await keyed_lb(nursery, [node], master_key="")
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{lb.url}/key/generate", json={})
            assert answer.status_code == 403
            assert answer.json()["error"]["code"] == "keys_disabled"
        assert (await chat(lb, "anything")).choices


async def test_the_clients_key_never_reaches_the_node(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await keyed_lb(nursery, [node])
        key = (await generate(lb))["key"]
        await chat(lb, key)
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{lb.url}/v1/chat/completions",
                                     headers={"authorization": f"Bearer {key}", "x-api-key": key},
                                     json={"model": MODEL, **CHAT})
            assert answer.status_code == 200
        seen = [r for r in await node.requests() if r["path"] == "/v1/chat/completions"]
        assert len(seen) == 2
        for request in seen:
            assert "authorization" not in request["headers"]
            assert "x-api-key" not in request["headers"]
            assert key not in str(request)


async def test_models_need_a_key_and_list_what_it_may_use(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL, "other"))
        lb = await keyed_lb(nursery, [node])
        key = (await generate(lb, models=[MODEL]))["key"]
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{lb.url}/v1/models")).status_code == 401
        listed = [m.id async for m in client(lb, key).models.list()]
        assert listed == [MODEL]
        assert sorted([m.id async for m in client(lb, MASTER).models.list()]) == [MODEL, "other"]
        assert (await client(lb, key).models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError):
            await client(lb, key).models.retrieve("other")


async def test_the_operators_limits_hold_without_keys(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await keyed_lb(nursery, [node], master_key="",
                            rate_limits=load_settings(env={"LB_RATE_LIMITS": '{"*": {"rpm": 3}}'}
                                                      ).rate_limits)
        for _ in range(3):
            await chat(lb, "no-key-needed")
        with pytest.raises(openai.RateLimitError) as refused:
            await chat(lb, "no-key-needed")
        assert "all requests: 3 requests per minute" in refused.value.message
        assert refused.value.response.headers["x-ratelimit-limit-requests"] == "3"
        assert await node.chats() == 3


async def test_a_models_limit_is_shared_by_keys_and_refusals_cost_the_key_nothing(
    nursery: trio.Nursery
) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL, "other"))
        lb = await keyed_lb(nursery, [node], rate_limits={MODEL: parse_limits({"rpm": 2})})
        alice = (await generate(lb, rpm_limit=3))["key"]
        bob = (await generate(lb))["key"]
        await chat(lb, alice)
        await chat(lb, bob)
        for key in (alice, bob, MASTER):  # the model's limit holds for every key
            with pytest.raises(openai.RateLimitError) as refused:
                await chat(lb, key)
            assert f"model {MODEL}: 2 requests per minute" in refused.value.message
        # alice's own allowance lost nothing to those refusals: 2 of 3 left
        for _ in range(2):
            await chat(lb, alice, "other")
        with pytest.raises(openai.RateLimitError) as refused:
            await chat(lb, alice, "other")
        assert "this key: 3 requests per minute" in refused.value.message


@pytest.mark.parametrize(
    "text", ['{"*": {"rpm": 0}}', '{"m": {"rps": 1}}', '{"m": 5}', "[1]", '{"m": {"tpm": true}}'],
)
def test_bad_rate_limits_name_the_setting(text: str) -> None:
    with pytest.raises(ConfigError, match="LB_RATE_LIMITS"):
        load_settings(env={"LB_RATE_LIMITS": text})


async def test_keys_on_the_anthropic_edge(nursery: trio.Nursery) -> None:
    """/v1/messages takes the key as x-api-key (or a bearer token) and refuses in Anthropic's
    shape: no key 401, a model the key may not use 403, its RPM spent 429 with the headers."""
    import anthropic

    node = await start_mock(nursery, models=(MODEL,))
    lb = await keyed_lb(nursery, [node])
    key = (await generate(lb, models=[MODEL], rpm_limit=1))["key"]
    asking: Any = {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient() as http:  # the SDK will not send a request without a key
        refused = await http.post(f"{lb.url}/v1/messages", json={"model": MODEL, **asking})
    assert refused.status_code == 401
    assert refused.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": refused.json()["error"]["message"]}}
    keyed = anthropic.AsyncAnthropic(base_url=lb.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        await keyed.messages.create(model="other-model", **asking)
    answer = await keyed.messages.create(model=MODEL, **asking)
    assert answer.content[0].type == "text"
    with pytest.raises(anthropic.RateLimitError) as limited:
        await keyed.messages.create(model=MODEL, **asking)
    headers = limited.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "1" and "retry-after" in headers
    assert all(k.lower() not in ("x-api-key", "authorization")
               for k, _ in (await node.requests())[-1]["raw_headers"])
