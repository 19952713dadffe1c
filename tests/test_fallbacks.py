"""Fallbacks: when every node of a model fails, its fallback models are tried, in order, each
asked for under its own name, inside the one deadline."""

from __future__ import annotations

import httpx
import pytest
import trio

from lb.config import ConfigError, NodeConfig, load_settings
from tests.harness import CHAT, RunningMock, start_lb, start_mock


def fixed(mock: RunningMock, model: str) -> NodeConfig:
    """A node with a fixed model list: never probed, so a faulty one stays in routing."""
    return NodeConfig(mock.url, models=(model,))


async def _chat(url: str, model: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(f"{url}/v1/chat/completions", json={**CHAT, "model": model})


async def test_a_failing_model_falls_back_in_order(nursery: trio.Nursery) -> None:
    big = await start_mock(nursery, models=["big"], fault="status=500")
    medium = await start_mock(nursery, models=["medium"], fault="status=503")
    small = await start_mock(nursery, models=["small"])
    lb = await start_lb(
        nursery, [small], configs=(fixed(big, "big"), fixed(medium, "medium")),
        fallbacks={"big": ("medium", "small")}, max_retries=0,
    )
    response = await _chat(lb.url, "big")
    assert response.status_code == 200
    assert response.headers["x-routed-node"] == small.key
    assert response.headers["x-attempts"] == "3"
    assert (await small.requests())[-1]["body"]["model"] == "small"
    assert (await medium.requests())[-1]["body"]["model"] == "medium"


async def test_without_fallbacks_the_failure_is_the_clients_answer(
    nursery: trio.Nursery,
) -> None:
    big = await start_mock(nursery, models=["big"], fault="status=500")
    small = await start_mock(nursery, models=["small"])
    lb = await start_lb(nursery, [small], configs=(fixed(big, "big"),), max_retries=0)
    response = await _chat(lb.url, "big")
    assert response.status_code == 502
    assert await small.chats() == 0


async def test_a_model_with_no_node_up_falls_back(nursery: trio.Nursery) -> None:
    small = await start_mock(nursery, models=["small"])
    lb = await start_lb(nursery, [small], fallbacks={"big": ("small",)})
    response = await _chat(lb.url, "big")
    assert response.status_code == 200
    assert (await small.requests())[-1]["body"]["model"] == "small"


def test_fallbacks_in_every_form() -> None:
    assert load_settings(env={"MODEL_FALLBACKS": "a=b|c, d=e"}).fallbacks == {
        "a": ("b", "c"), "d": ("e",)
    }
    from lb.config import _fallbacks

    litellm_form = [{"gpt-4": ["gpt-3.5-turbo"]}, {"main": ["fast", "swap"]}]
    assert _fallbacks(litellm_form) == {"gpt-4": ("gpt-3.5-turbo",), "main": ("fast", "swap")}
    assert _fallbacks({"a": ["b"]}) == {"a": ("b",)}
    for bad in ("a", "a="):
        with pytest.raises(ConfigError):
            load_settings(env={"MODEL_FALLBACKS": bad})
