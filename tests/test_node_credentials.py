"""Credentials: a client's key for lb never reaches a node; a node gets lb's own credential,
or the client's header only when configured to forward it. Fixed model lists need no probe."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from lb.config import ConfigError, NodeConfig, load_settings
from tests.harness import CHAT, RunningMock, start_lb, start_mock


def _sent(requests: list[dict[str, Any]], name: str) -> list[str]:
    """The values of header `name` on the chat requests a mock received."""
    return [
        value for request in requests if request["path"] == "/v1/chat/completions"
        for key, value in request["raw_headers"] if key.lower() == name
    ]


async def _chat(url: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{url}/v1/chat/completions", json={**CHAT, "model": "m"}, headers=headers
        )


async def test_the_clients_key_is_not_sent_to_a_node(nursery: trio.Nursery) -> None:
    mock = await start_mock(nursery, models=["m"])
    lb = await start_lb(nursery, [mock])
    response = await _chat(lb.url, authorization="Bearer client-key-for-lb")
    assert response.status_code == 200
    assert _sent(await mock.requests(), "authorization") == []


async def test_a_node_gets_lbs_own_credential(nursery: trio.Nursery) -> None:
    mock = await start_mock(nursery, models=["m"])
    lb = await start_lb(nursery, [], configs=(NodeConfig(mock.url, api_key="node-secret"),))
    response = await _chat(lb.url, authorization="Bearer client-key-for-lb")
    assert response.status_code == 200
    assert _sent(await mock.requests(), "authorization") == ["Bearer node-secret"]


async def test_forward_auth_sends_the_clients_header_on(nursery: trio.Nursery) -> None:
    mock = await start_mock(nursery, models=["m"])
    lb = await start_lb(nursery, [], configs=(NodeConfig(mock.url, forward_auth=True),))
    assert (await _chat(lb.url, authorization="Bearer client-key")).status_code == 200
    assert (await _chat(lb.url)).status_code == 200
    assert _sent(await mock.requests(), "authorization") == ["Bearer client-key"]


async def test_a_fixed_model_list_serves_without_a_probe(nursery: trio.Nursery) -> None:
    mock: RunningMock = await start_mock(nursery, models=["m"])
    lb = await start_lb(nursery, [], configs=(NodeConfig(mock.url, models=("m", "m2")),))
    response = await _chat(lb.url)
    assert response.status_code == 200
    async with httpx.AsyncClient() as client:
        models = (await client.get(f"{lb.url}/v1/models")).json()
    assert {item["id"] for item in models["data"]} == {"m", "m2"}
    assert "/v1/models" not in (await mock.stats())["by_path"]


def test_provider_settings_add_nodes() -> None:
    settings = load_settings(env={
        "OPENAI_API_KEY": "sk-1", "OPENAI_MODELS": "gpt-4o,gpt-4o-mini",
        "ANTHROPIC_API_KEY": "sk-ant", "OLLAMA_BASE_URL": "http://gpu:11434",
    })
    openai, anthropic, ollama = settings.provider_nodes()
    assert (openai.url, openai.dialect, openai.models) == (
        "https://api.openai.com:443", "openai", ("gpt-4o", "gpt-4o-mini")
    )
    assert openai.api_key == "sk-1" and "sk-1" not in repr(openai)
    assert (anthropic.url, anthropic.dialect) == ("https://api.anthropic.com:443", "anthropic")
    assert anthropic.models == ("claude-3-opus-20240229", "claude-3-sonnet-20240229")
    assert (ollama.url, ollama.dialect, ollama.models) == ("http://gpu:11434", "ollama", ())
    assert load_settings(env={}).provider_nodes() == ()


def test_a_provider_node_may_not_repeat_a_configured_one() -> None:
    try:
        load_settings(env={"LB_NODES": "gpu:11434", "OLLAMA_BASE_URL": "http://gpu:11434"})
    except ConfigError as exc:
        assert "gpu:11434 is listed twice" in str(exc)
    else:
        raise AssertionError("a node listed twice was accepted")


def test_node_fields_in_yaml() -> None:
    from lb.config import _nodes

    (node,) = _nodes([{
        "url": "https://api.anthropic.com", "dialect": "Anthropic", "api_key": "k",
        "models": ["claude"], "forward_auth": False,
    }])
    assert (node.dialect, node.api_key, node.models) == ("anthropic", "k", ("claude",))
    for bad, message in (({"url": "x", "dialect": "cohere"}, "dialect must be one of"),
                         ({"url": "x", "secret": 1}, "unknown node field")):
        try:
            _nodes([bad])
        except ValueError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")


async def test_a_node_refusing_lbs_credential_is_failed_over(nursery: trio.Nursery) -> None:
    """A 401 from a node lb gives a key to is lb's misconfiguration, not the client's fault:
    the node is charged and the request goes to another."""
    wrong = await start_mock(nursery, dialect="anthropic", models=("m",), api_key="right")
    good = await start_mock(nursery, dialect="anthropic", models=("m",), api_key="right")
    configs = (
        NodeConfig(wrong.url, dialect="anthropic", api_key="stale", models=("m",)),
        NodeConfig(good.url, dialect="anthropic", api_key="right", models=("m",)),
    )
    lb = await start_lb(nursery, [], configs=configs, routing_strategy="FAILOVER",
                        admin_key="admin")
    response = await _chat(lb.url)
    assert response.status_code == 200
    assert response.headers["x-routed-node"] == good.key
    assert response.headers["x-attempts"] == "2"
    async with httpx.AsyncClient(headers={"authorization": "Bearer admin"}) as client:
        nodes = (await client.get(f"{lb.url}/v1/nodes")).json()["nodes"]
    charged = next(node for node in nodes if node["node"] == wrong.key)
    assert charged["failures"] == 1 and "refused lb's credential" in charged["last_error"]
