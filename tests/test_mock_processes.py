"""`lb mock --processes N`: one port, N processes (SO_REUSEPORT), each its own node; they
all go when the first one does, however it ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

LB = [sys.executable, "-m", "lb.cli"]
ENV = {k: v for k, v in os.environ.items() if k not in ("LB_NODES", "LB_CONFIG")}


@contextmanager
def mock_processes(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [*LB, "mock", "--port", "0", *args], env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("lb mock listening on http://127.0.0.1:"), line
        yield process, line.rsplit(" ", 1)[1]
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_processes_share_one_port_and_each_keeps_its_own_counters() -> None:
    with mock_processes("--processes", "2", "--tokens", "3") as (process, url):
        assert len(children(process.pid)) == 1
        chats = 41  # odd: the two processes' counts differ
        body = {"model": "mock-model", "messages": [{"role": "user", "content": "x"}]}
        for _ in range(chats):  # each on a new connection: the kernel picks the process
            answer = httpx.post(f"{url}/v1/chat/completions", json=body)
            assert answer.json()["usage"]["completion_tokens"] == 3
        counts = set()
        for _ in range(40):
            stats = httpx.get(f"{url}/mock/stats").json()
            counts.add(stats["by_path"].get("/v1/chat/completions", 0))
        assert len(counts) == 2 and sum(counts) == chats


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_the_other_processes_end_with_the_first(sig: signal.Signals) -> None:
    with mock_processes("--processes", "3") as (process, url):
        others = children(process.pid)
        assert len(others) == 2
        assert httpx.get(f"{url}/health").status_code == 200
        process.send_signal(sig)
        process.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in others) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in others)


def test_a_port_in_use_is_exit_2() -> None:
    with socket.socket() as taken:  # without SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*LB, "mock", "--port", str(port), "--processes", "2"], env=ENV,
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and f"--port={port}: cannot listen" in done.stderr
