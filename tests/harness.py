"""Start mock nodes and lb in-process on real sockets, each stoppable on its own."""

from __future__ import annotations

from typing import Any

import attrs
import httpx
import openai
import trio

from lb.app import serve
from lb.config import NodeConfig, Settings
from lb.testing import MockNode


@attrs.define
class Running:
    port: int
    scope: trio.CancelScope

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.scope.cancel()


@attrs.define
class RunningMock(Running):
    node: MockNode = attrs.field(kw_only=True)

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            result: dict[str, Any] = (await client.get(f"{self.url}/mock/stats")).json()
            return result

    async def chats(self) -> int:
        """Chat requests the node received (lb's own /v1/models probes excluded)."""
        count: int = (await self.stats())["by_path"].get("/v1/chat/completions", 0)
        return count

    async def requests(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            result: list[dict[str, Any]] = (
                await client.get(f"{self.url}/mock/requests")
            ).json()
            return result


async def _start(nursery: trio.Nursery, serve_fn: Any) -> tuple[int, trio.CancelScope]:
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await serve_fn(task_status=task_status)

    port: int = await nursery.start(run)
    return port, scope


async def start_mock(nursery: trio.Nursery, **options: Any) -> RunningMock:
    node = MockNode(**options)
    port, scope = await _start(
        nursery, lambda task_status: node.serve("127.0.0.1", 0, task_status=task_status)
    )
    return RunningMock(port, scope, node=node)


async def start_mock_on(nursery: trio.Nursery, port: int, **options: Any) -> RunningMock:
    """A mock node on a given port (e.g. the port of one that was stopped)."""
    node = MockNode(**options)
    bound, scope = await _start(
        nursery, lambda task_status: node.serve("127.0.0.1", port, task_status=task_status)
    )
    return RunningMock(bound, scope, node=node)


async def start_lb(nursery: trio.Nursery, nodes: list[Running], **options: Any) -> Running:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        nodes=tuple(NodeConfig(node.url) for node in nodes),
        **options,
    )
    port, scope = await _start(
        nursery,
        lambda task_status: serve(settings, handle_signals=False, task_status=task_status),
    )
    return Running(port, scope)


def sdk(lb: Running) -> openai.AsyncOpenAI:
    """The official client, with its own retries off so that lb's behaviour shows."""
    return openai.AsyncOpenAI(base_url=f"{lb.url}/v1", api_key="test", max_retries=0)


CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hello world"}]}
