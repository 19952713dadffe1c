"""`/v1/admin/prefs` on one instance (no Redis): auth, validation, and effect on routing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from harness import CHAT, start_lb, start_mock

AUTH = {"authorization": "Bearer s3cret"}


async def test_disabled_without_a_key_is_403(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=("m",))
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient() as client:
            for method in ("GET", "POST"):
                answer = await client.request(method, f"{lb.url}/v1/admin/prefs", headers=AUTH,
                                              json={})
                assert answer.status_code == 403
                assert answer.json()["error"]["code"] == "admin_disabled"


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"},
     {"authorization": "s3cret"}],
)
async def test_wrong_or_missing_key_is_401(nursery: trio.Nursery, headers: dict[str, str]) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=("m",))
        lb = await start_lb(nursery, [node], admin_key="s3cret")
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{lb.url}/v1/admin/prefs", headers=headers,
                                       json={"preferred_models": ["x"]})
            assert answer.status_code == 401
            assert answer.json()["error"]["type"] == "authentication_error"
            assert answer.headers["www-authenticate"] == "Bearer"
            prefs = (await client.get(f"{lb.url}/v1/admin/prefs", headers=AUTH)).json()
            assert prefs["preferred_models"] == []  # nothing changed


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1]", "JSON object"),
        (b'{"preferred": ["x"]}', "unknown field 'preferred'"),
        (b'{"preferred_models": 5}', "preferred_models"),
        (b'{"maxconn": {"nohost": 3}}', "host:port"),
        (b'{"maxconn": {"a:1": -1}}', "maxconn['a:1']"),
        (b'{"maxconn": {"a:1": true}}', "maxconn['a:1']"),
    ],
)
async def test_bad_prefs_are_400_and_change_nothing(
    nursery: trio.Nursery, body: bytes, named: str
) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=("m",))
        lb = await start_lb(nursery, [node], admin_key="s3cret")
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{lb.url}/v1/admin/prefs", headers=AUTH, content=body)
            assert answer.status_code == 400
            assert named in answer.json()["error"]["message"]
            prefs = (await client.get(f"{lb.url}/v1/admin/prefs", headers=AUTH)).json()
            assert prefs == {"preferred_models": [], "maxconn": {}, "version": 0}


async def test_prefs_change_routing_at_run_time(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=("qwen3-8b", "gemma3-270m"), ttft_ms=300)
        lb = await start_lb(nursery, [node], admin_key="s3cret",
                            preferred_models=("qwen3-8b",))
        async with httpx.AsyncClient() as client:

            async def chat() -> Any:
                return await client.post(f"{lb.url}/v1/chat/completions",
                                         json={"model": "auto", **CHAT})

            assert (await chat()).json()["model"] == "qwen3-8b"
            changed = await client.post(
                f"{lb.url}/v1/admin/prefs", headers=AUTH,
                json={"preferred_models": "gemma3-270m;qwen3-8b", "maxconn": {node.key: 1}},
            )
            assert changed.status_code == 200
            assert changed.json() == {
                "preferred_models": ["gemma3-270m", "qwen3-8b"],
                "maxconn": {node.key: 1}, "version": 1, "shared": False,
            }
            assert (await chat()).json()["model"] == "gemma3-270m"
            # The new cap of 1 is in force: a second concurrent request is turned away.
            async with trio.open_nursery() as pair:
                answers: list[int] = []

                async def one() -> None:
                    answers.append((await chat()).status_code)

                pair.start_soon(one)
                pair.start_soon(one)
            assert sorted(answers) == [200, 429]
            removed = await client.post(f"{lb.url}/v1/admin/prefs", headers=AUTH,
                                        json={"maxconn": {node.key: None}})
            assert removed.json()["maxconn"] == {}
            nodes = (await client.get(f"{lb.url}/v1/nodes", headers=AUTH)).json()["nodes"]
            assert nodes[0]["maxconn"] == 0 and nodes[0]["local_maxconn"] == 0
