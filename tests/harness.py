"""Start mock nodes and lb in-process on real sockets, each stoppable on its own."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import attrs
import httpx
import openai
import orjson
import redis
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
        """Chat requests the node received (lb's own /v1/models probes excluded): OpenAI's
        `/v1/chat/completions`, or `/v1/messages` for a mock playing Anthropic."""
        by_path = (await self.stats())["by_path"]
        count: int = by_path.get("/v1/chat/completions", 0) + by_path.get("/v1/messages", 0)
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


async def start_lb(
    nursery: trio.Nursery, nodes: list[Running], *, configs: tuple[NodeConfig, ...] = (),
    **options: Any,
) -> Running:
    """lb in front of `nodes` (plain URLs) and `configs` (nodes with more settings)."""
    settings = Settings(
        host="127.0.0.1",
        port=0,
        nodes=(*(NodeConfig(node.url) for node in nodes), *configs),
        **options,
    )
    port, scope = await _start(
        nursery,
        lambda task_status: serve(settings, handle_signals=False, task_status=task_status),
    )
    return Running(port, scope)


async def start_lb_with(nursery: trio.Nursery, settings: Settings) -> Running:
    """lb with exactly these settings (listening on 127.0.0.1, a free port)."""
    settings = attrs.evolve(settings, host="127.0.0.1", port=0)
    port, scope = await _start(
        nursery,
        lambda task_status: serve(settings, handle_signals=False, task_status=task_status),
    )
    return Running(port, scope)


def sdk(lb: Running) -> openai.AsyncOpenAI:
    """The official client, with its own retries off so that lb's behaviour shows."""
    return openai.AsyncOpenAI(base_url=f"{lb.url}/v1", api_key="test", max_retries=0)


def anthropic_sdk(target: Running, api_key: str = "test") -> anthropic.AsyncAnthropic:
    """The official Anthropic client (of lb's /v1/messages, or of a mock node started with
    `start_mock(nursery, dialect="anthropic", api_key=...)`), its own retries off."""
    return anthropic.AsyncAnthropic(base_url=target.url, api_key=api_key, max_retries=0)


CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hello world"}]}


# --- scripted nodes: exact bytes, for the faults a well-behaved server never shows -----------

# (request head, the connection, bytes received after the head)
Script = Callable[[bytes, trio.SocketStream, bytearray], Awaitable[None]]


async def read_head(stream: trio.SocketStream, buffered: bytearray) -> bytes:
    """One request head (up to the blank line); what follows stays in `buffered`."""
    while b"\r\n\r\n" not in buffered:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError
        buffered += data
    head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
    buffered[:] = rest
    return head


async def read_body(stream: trio.SocketStream, head: bytes, buffered: bytearray) -> bytes:
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffered) < length:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError
        buffered += data
    body = bytes(buffered[:length])
    del buffered[:length]
    return body


def json_answer(obj: Any, status: str = "200 OK") -> bytes:
    body = orjson.dumps(obj)
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def start_scripted(
    nursery: trio.Nursery, script: Script, models: tuple[str, ...] = ("llama-3.1-8b",)
) -> Running:
    """A node that answers lb's `GET /v1/models` probes properly and hands every other
    request's head to `script` (which reads the body itself, if it wants, with `read_body`)."""
    listing = json_answer(
        {"object": "list", "data": [{"id": model, "object": "model"} for model in models]}
    )

    async def handle(stream: trio.SocketStream) -> None:
        buffered = bytearray()
        try:
            while True:
                head = await read_head(stream, buffered)
                if head.startswith(b"GET /v1/models"):
                    await stream.send_all(listing)
                    continue
                await script(head, stream, buffered)
                return
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as inner:
                inner.start_soon(trio.serve_listeners, handle, listeners)
                task_status.started(port)

    port: int = await nursery.start(run)
    return Running(port, scope)


class RedisServer:
    """A throwaway redis-server that tests may stop and start again on the same port."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is needed (Debian package redis-server)"
        self.process = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
