"""The home lab's LiteLLM config, served as is: handles reach their deployments under the
provider's model names with the configured keys, a wildcard route passes the requested name
through, a prompt too long for a handle's window goes to its context-window fallback, and
/v1/models lists the handles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
import yaml

from lb.config import load_settings
from tests.harness import RunningMock, start_lb_with, start_mock

FIXTURE = Path(__file__).parent / "fixtures" / "homelab-litellm.yaml"
MLX_MODELS = [
    "mlx-gpt-oss-20b-mxfp4-q4", "mlx-gpt-oss-120b-mxfp4-q4", "mlx-qwen3-4b-q4-instruct",
    "mlx-qwen3-30b-a3b-q4-instruct",
]
ENV = {
    "MLX_API_KEY": "mlx-secret", "OPTILLM_API_KEY": "optillm-secret",
    "OPTILLM_API_BASE": "http://127.0.0.1:9/v1",
}


def homelab(tmp_path: Path, mlx: RunningMock) -> Path:
    """The fixture with the MLX server's address pointed at `mlx` (and no master key, so
    that these requests need none; test_catalogue.py runs the file with its key)."""
    doc: dict[str, Any] = yaml.safe_load(FIXTURE.read_text())
    for entry in doc["model_list"]:
        if "192.168.1.72:8100" in entry["litellm_params"]["api_base"]:
            entry["litellm_params"]["api_base"] = f"{mlx.url}/v1"
    del doc["general_settings"]
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def _chat(client: httpx.AsyncClient, url: str, model: str, text: str = "hi") -> Any:
    response = await client.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": text}]},
    )
    assert response.status_code == 200, response.text
    return response


async def test_the_home_lab_config_serves(nursery: trio.Nursery, tmp_path: Path) -> None:
    mlx = await start_mock(nursery, models=MLX_MODELS)
    settings = load_settings(config_file=homelab(tmp_path, mlx), env=ENV)
    lb = await start_lb_with(nursery, settings)
    async with httpx.AsyncClient(timeout=10) as client:
        await _chat(client, lb.url, "main")
        await _chat(client, lb.url, "deep")
        await _chat(client, lb.url, "mlx-qwen3-30b-a3b-q4-instruct")  # the mlx-* route
        # ~40k tokens: more than fast's 32768, so its context-window fallback (main) takes it
        long = await _chat(client, lb.url, "fast", "word " * 40_000)
        listing = (await client.get(f"{lb.url}/v1/models")).json()
    sent = [request for request in await mlx.requests()
            if request["path"] == "/v1/chat/completions"]
    assert [request["body"]["model"] for request in sent] == [
        "mlx-gpt-oss-20b-mxfp4-q4", "mlx-gpt-oss-120b-mxfp4-q4",
        "mlx-qwen3-30b-a3b-q4-instruct", "mlx-gpt-oss-20b-mxfp4-q4",
    ]
    assert long.headers["x-selected-model"] == "main"
    assert all(
        ["authorization", "Bearer mlx-secret"] in [[k.lower(), v] for k, v in r["raw_headers"]]
        for r in sent
    )
    assert {entry["id"] for entry in listing["data"]} == {"main", "deep", "fast", "swap", "boost"}


async def test_a_prompt_too_long_for_every_window_is_refused(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    mlx = await start_mock(nursery, models=MLX_MODELS)
    settings = load_settings(config_file=homelab(tmp_path, mlx), env=ENV)
    lb = await start_lb_with(nursery, settings)
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{lb.url}/v1/chat/completions",
            json={"model": "swap", "messages": [{"role": "user", "content": "word " * 300_000}]},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert await mlx.chats() == 0


async def test_a_wildcard_route_without_a_key(nursery: trio.Nursery, tmp_path: Path) -> None:
    """`mlx-*` on a node lb has no credential for: the requested name still reaches it."""
    mlx = await start_mock(nursery, models=MLX_MODELS)
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"model_list": [{
        "model_name": "mlx-*", "litellm_params": {"model": "openai/mlx-*",
                                                 "api_base": f"{mlx.url}/v1"},
    }]}))
    lb = await start_lb_with(nursery, load_settings(config_file=config, env={}))
    async with httpx.AsyncClient(timeout=10) as client:
        await _chat(client, lb.url, "mlx-qwen3-4b-q4-instruct")
    assert (await mlx.requests())[-1]["body"]["model"] == "mlx-qwen3-4b-q4-instruct"
