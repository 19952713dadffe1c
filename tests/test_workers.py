"""`lb serve --workers 2` as a user runs it: a parent process, two workers and a private
redis-server, all real processes; mock nodes in this process on real sockets."""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
import yaml
from harness import CHAT, RunningMock, start_mock

from lb.config import ConfigError, load_settings
from lb.workers import read_settings

LB = [sys.executable, "-m", "lb.cli"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("LB_", "REDIS_", "SCAN_"))}
ADMIN = {"authorization": "Bearer k"}
MODEL = "llama-3.1-8b"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define
class Workers:
    process: subprocess.Popen[str]
    url: str
    log: Path

    def stderr(self) -> str:
        return self.log.read_text()

    async def who(self) -> dict[str, Any]:
        """Which worker answers a request on a new connection."""
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.get(f"{self.url}/v1/debug/services", headers=ADMIN)
            process: dict[str, Any] = answer.json()["process"]
            return process

    async def pids_until(self, done: Callable[[dict[int, dict[str, Any]]], bool]) -> dict[
        int, dict[str, Any]
    ]:
        """Ask on new connections until the workers seen (pid -> who) satisfy `done`."""
        seen: dict[int, dict[str, Any]] = {}
        while not done(seen):
            who = await self.who()
            seen[who["pid"]] = who
        return seen

    async def wait(self) -> int:
        code: int = await trio.to_thread.run_sync(self.process.wait)
        return code


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (any of its threads may have forked them)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


@asynccontextmanager
async def lb_workers(
    tmp_path: Path, mocks: list[RunningMock], *, workers: int = 2, **env: str
) -> AsyncIterator[Workers]:
    port = free_port()
    log = tmp_path / f"lb-{port}.log"
    settings = {
        "LB_ADMIN_KEY": "k", "LB_DRAIN_SECS": "10", "SCAN_INTERVAL": "5",
        "LB_NODES": ",".join(mock.url for mock in mocks), **env,
    }
    with log.open("w") as stderr:
        process = subprocess.Popen(  # noqa: ASYNC220 (a fork, once per test)
            [*LB, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            env={**ENV, **settings}, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    running = Workers(process, f"http://127.0.0.1:{port}", log)
    try:
        assert process.stdout is not None
        with trio.fail_after(60):
            line = await trio.to_thread.run_sync(process.stdout.readline, abandon_on_cancel=True)
        assert line.strip() == f"lb listening on {running.url}", running.stderr()
        yield running
    finally:
        if process.poll() is None:  # a test that failed half-way: drain what is left
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await running.wait()
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def test_two_workers_serve_and_one_killed_is_restarted(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        mock = await start_mock(nursery, models=(MODEL,))
        async with lb_workers(tmp_path, [mock]) as lb:
            parent = lb.process.pid
            with trio.fail_after(60):
                seen = await lb.pids_until(lambda seen: len(seen) == 2)
            assert sorted(who["worker"] for who in seen.values()) == [0, 1]
            assert set(seen) <= children(parent)  # workers, not strays
            client = openai.AsyncOpenAI(base_url=f"{lb.url}/v1", api_key="x", max_retries=0)
            answer = await client.chat.completions.create(model=MODEL, **CHAT)
            assert answer.choices[0].message.content

            victim = next(pid for pid, who in seen.items() if who["worker"] == 1)
            os.kill(victim, signal.SIGKILL)
            with trio.fail_after(60):
                back = await lb.pids_until(
                    lambda seen: any(who["restarts"] == 1 for who in seen.values())
                )
            replacement = next(pid for pid, who in back.items() if who["restarts"] == 1)
            assert replacement != victim and back[replacement]["worker"] == 1
            assert not alive(victim) and replacement in children(parent)
            assert f"worker 1 (pid {victim}) exited with signal SIGKILL" in lb.stderr()
            answer = await client.chat.completions.create(model=MODEL, **CHAT)
            assert answer.choices[0].message.content

            lb.process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                assert await lb.wait() == 0
            assert not any(alive(pid) for pid in (*seen, replacement)), lb.stderr()
        nursery.cancel_scope.cancel()


async def test_sigterm_lets_streams_in_flight_finish_then_every_process_exits_0(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        mock = await start_mock(nursery, models=(MODEL,), itl_ms=60, tokens=20)
        async with lb_workers(tmp_path, [mock]) as lb:
            processes = children(lb.process.pid)
            assert len(processes) == 3  # two workers and the private redis-server
            clients = [  # one connection each: the streams spread over the workers
                openai.AsyncOpenAI(base_url=f"{lb.url}/v1", api_key="x", max_retries=0)
                for _ in range(6)
            ]
            streams = [
                await client.chat.completions.create(model=MODEL, stream=True, **CHAT)
                for client in clients
            ]
            chunks = [[await anext(aiter(stream))] for stream in streams]  # all began
            lb.process.send_signal(signal.SIGTERM)

            async def read(stream: Any, into: list[Any]) -> None:
                async for chunk in stream:
                    into.append(chunk)

            async def refused() -> None:
                port = int(lb.url.rsplit(":", 1)[1])
                while True:  # new connections are refused while the workers drain
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=1):
                            pass
                    except ConnectionRefusedError:
                        return
                    await trio.sleep(0.02)

            with trio.fail_after(30):
                async with trio.open_nursery() as readers:
                    readers.start_soon(refused)
                    for stream, into in zip(streams, chunks, strict=True):
                        readers.start_soon(read, stream, into)
            for into in chunks:  # every stream completed: role chunk, 20 tokens, finish
                assert len(into) == 22 and into[-1].choices[0].finish_reason == "stop"
            with trio.fail_after(30):
                assert await lb.wait() == 0
            assert not any(alive(pid) for pid in processes), lb.stderr()
        nursery.cancel_scope.cancel()


async def test_a_node_cap_is_split_exactly_over_the_workers(tmp_path: Path) -> None:
    """maxconn 3 over two workers: never more than 3 in flight at the node, and 3 reached
    only when both workers hold requests at once (shares 2 + 1)."""
    async with trio.open_nursery() as nursery:
        mock = await start_mock(nursery, models=(MODEL,), ttft_ms=150)
        async with lb_workers(
            tmp_path, [mock], DEFAULT_MAXCONN="3", QUEUE_TIMEOUT_SECS="60", SCAN_INTERVAL="60"
        ) as lb:
            mock.node.stats.reset()  # the start's probes are not chats

            async def chat(results: list[int]) -> None:
                async with httpx.AsyncClient(timeout=60) as client:  # a new connection
                    answer = await client.post(
                        f"{lb.url}/v1/chat/completions", json={"model": MODEL, **CHAT}
                    )
                    results.append(answer.status_code)

            def workers_seen() -> int:
                return len({r["headers"]["x-request-id"][:24] for r in mock.node.recent_requests()
                            if r["path"] == "/v1/chat/completions"})

            with trio.fail_after(120):
                for _ in range(8):  # waves until both workers held requests at once
                    results: list[int] = []
                    async with trio.open_nursery() as wave:
                        for _ in range(12):
                            wave.start_soon(chat, results)
                    assert results == [200] * 12  # waiting for a slot is not a 429
                    assert mock.node.stats.max_concurrent <= 3
                    if mock.node.stats.max_concurrent == 3 and workers_seen() == 2:
                        break
                else:
                    pytest.fail(f"never 3 in flight over 2 workers: {mock.node.stats}")
        nursery.cancel_scope.cancel()


async def test_one_worker_scans_and_admin_changes_reach_every_worker(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        mock = await start_mock(nursery, models=(MODEL, "qwen3-0.6b"))
        async with lb_workers(tmp_path, [mock], SCAN_INTERVAL="0.5") as lb:
            with trio.fail_after(60):
                seen = await lb.pids_until(lambda seen: len(seen) == 2)
            before = (await mock.stats())["by_path"].get("/v1/models", 0)
            window = 5.0
            await trio.sleep(window)
            probes = (await mock.stats())["by_path"].get("/v1/models", 0) - before
            # One scanner probes about window / interval times; two would probe twice that.
            assert 2 <= probes <= window / 0.5 + 3, probes

            async with httpx.AsyncClient(timeout=10) as client:
                changed = await client.post(
                    f"{lb.url}/v1/admin/prefs", headers=ADMIN,
                    json={"preferred_models": ["qwen3-0.6b"]},
                )
                assert changed.status_code == 200 and changed.json()["shared"] is True

            async def prefs_seen_by(pid: int) -> list[str]:
                while True:
                    async with httpx.AsyncClient(timeout=10) as client:
                        who = (await client.get(f"{lb.url}/v1/debug/services",
                                                headers=ADMIN)).json()["process"]["pid"]
                        if who == pid:  # the same connection: the same worker answers
                            prefs = (await client.get(f"{lb.url}/v1/admin/prefs",
                                                      headers=ADMIN)).json()
                            return list(prefs["preferred_models"])

            with trio.fail_after(60):
                for pid in seen:
                    while await prefs_seen_by(pid) != ["qwen3-0.6b"]:
                        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def test_workers_need_a_store_and_refuse_demo(tmp_path: Path) -> None:
    result = subprocess.run(
        [*LB, "serve", "--workers", "2", "--demo", "--port", "0"], env=ENV,
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and "drop --workers" in result.stderr
    result = subprocess.run(
        [*LB, "serve", "--workers", "none"], env=ENV, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "workers" in result.stderr
    bin_dir = tmp_path / "bin"  # a PATH without redis-server (python found by full path)
    bin_dir.mkdir()
    result = subprocess.run(
        [*LB, "serve", "--workers", "2", "--port", "0"], env={**ENV, "PATH": str(bin_dir)},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and "redis-server" in result.stderr, result.stderr


async def test_workers_and_store_follow_a_parent_killed_with_sigkill(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        mock = await start_mock(nursery, models=(MODEL,))
        async with lb_workers(tmp_path, [mock]) as lb:
            processes = children(lb.process.pid)
            assert len(processes) == 3
            lb.process.kill()
            await lb.wait()
            with trio.fail_after(30):  # workers drain themselves; redis-server is signalled
                while any(alive(pid) for pid in processes):
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def test_workers_setting_takes_a_number_or_auto() -> None:
    assert load_settings(env={"LB_WORKERS": "auto"}).workers == (os.cpu_count() or 1)
    assert load_settings(env={"LB_WORKERS": "3"}).workers == 3
    assert load_settings(flags={"workers": "2"}).workers == 2
    with pytest.raises(ConfigError, match=r"LB_WORKERS=.0.: must be at least 1"):
        load_settings(env={"LB_WORKERS": "0"})


def test_a_worker_reads_its_parents_settings_catalogue_included(tmp_path: Path) -> None:
    """What the parent writes on a worker's stdin comes back equal, a LiteLLM catalogue (with
    its read-only mappings) included."""
    fixture = Path(__file__).parent / "fixtures" / "homelab-litellm.yaml"
    text = fixture.read_text()
    env = {name: "x" for name in re.findall(r"os\.environ/([A-Z_]+)", text)}
    doc = yaml.safe_load(text)
    del doc["general_settings"]  # a master key is refused until lb checks client keys
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(doc))
    settings = load_settings(config_file=config, env=env, flags={"workers": 2})
    assert settings.catalogue is not None
    payload = pickle.dumps(settings)
    read, write = os.pipe()
    with os.fdopen(write, "wb") as pipe:
        pipe.write(struct.pack("!Q", len(payload)) + payload)
    try:
        assert read_settings(read) == settings
    finally:
        os.close(read)
