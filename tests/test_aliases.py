"""Stable handles (`main`, `fast`, ...) for models: resolved before routing, listed by
/v1/models, and the only names listed when LB_ALIAS_ONLY is on."""

from __future__ import annotations

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from lb.config import ConfigError, load_settings, resolve_aliases
from tests.harness import CHAT, start_lb, start_mock


async def _models(url: str) -> dict[str, dict[str, object]]:
    async with httpx.AsyncClient() as client:
        listing = (await client.get(f"{url}/v1/models")).json()
    return {entry["id"]: entry for entry in listing["data"]}


async def test_an_alias_reaches_its_model(nursery: trio.Nursery) -> None:
    mock = await start_mock(nursery, models=["qwen3-32b", "qwen3-8b"])
    lb = await start_lb(
        nursery, [mock], aliases={"main": "qwen3-32b", "fast": "qwen3-8b", "gone": "nope"}
    )
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{lb.url}/v1/chat/completions", json={**CHAT, "model": "main"}
        )
        missing = await client.post(
            f"{lb.url}/v1/chat/completions", json={**CHAT, "model": "gone"}
        )
        one = (await client.get(f"{lb.url}/v1/models/fast")).json()
    assert response.status_code == 200
    assert response.headers["x-selected-model"] == "qwen3-32b"
    assert (await mock.requests())[-1]["body"]["model"] == "qwen3-32b"
    assert missing.status_code == 404
    assert one["alias_of"] == "qwen3-8b"
    listed = await _models(lb.url)
    assert set(listed) == {"qwen3-32b", "qwen3-8b", "main", "fast"}  # `gone` leads nowhere
    assert listed["main"]["alias_of"] == "qwen3-32b"


async def test_alias_only_lists_the_handles(nursery: trio.Nursery) -> None:
    mock = await start_mock(nursery, models=["qwen3-32b", "qwen3-8b"])
    lb = await start_lb(nursery, [mock], aliases={"main": "qwen3-32b"}, alias_only=True)
    assert set(await _models(lb.url)) == {"main"}


def test_aliases_from_the_environment() -> None:
    settings = load_settings(env={"MODEL_ALIASES": "main=big, big=qwen3-32b,fast=qwen3-8b"})
    assert settings.aliases == {"main": "qwen3-32b", "big": "qwen3-32b", "fast": "qwen3-8b"}
    for bad in ("main", "a=b,b=a", "=x"):
        with pytest.raises(ConfigError):
            load_settings(env={"MODEL_ALIASES": bad})


names = st.sampled_from("abcdefgh")


@given(st.dictionaries(names, names))
def test_every_alias_ends_at_a_model_or_is_a_cycle(pairs: dict[str, str]) -> None:
    def has_cycle(alias: str) -> bool:
        seen = set()
        while alias in pairs:
            if alias in seen:
                return True
            seen.add(alias)
            alias = pairs[alias]
        return False

    try:
        resolved = resolve_aliases(pairs)
    except ValueError:
        assert any(has_cycle(alias) for alias in pairs)
        return
    assert not any(has_cycle(alias) for alias in pairs)
    for alias, target in resolved.items():
        assert target not in pairs  # followed to the end
        step = alias
        while step in pairs:
            step = pairs[step]
        assert step == target
