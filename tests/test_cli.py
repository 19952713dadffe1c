"""`lb serve` and `lb mock` as a user runs them: subprocesses, signals, exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

LB = [sys.executable, "-m", "lb.cli"]
ENV = {k: v for k, v in os.environ.items() if k not in ("LB_NODES", "LB_CONFIG")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


Served = tuple[subprocess.Popen[str], str]


@contextmanager
def lb_serve(*args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    port = free_port()
    process = subprocess.Popen(
        [*LB, "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until lb says where it listens
        assert line.strip() == f"lb listening on http://127.0.0.1:{port}", line
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def run_lb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LB, *args], env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "http"], {}, "port='http'"),
        (["--node", "ftp://nowhere:1"], {}, "nodes="),
        ([], {"ROUTING_STRATEGY": "fastest"}, "ROUTING_STRATEGY='fastest'"),
        ([], {"LB_MAX_BODY_BYTES": "-5"}, "LB_MAX_BODY_BYTES='-5'"),
        (["--config", "/nonexistent/lb.yaml"], {}, "/nonexistent/lb.yaml"),
        (["--log-level", "chatty"], {}, "log_level='chatty'"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = run_lb("serve", *args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lb: "), result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr


def test_port_in_use_is_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_lb("serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2
    assert "already in use" in result.stderr and "Traceback" not in result.stderr


def test_config_file_and_env(tmp_path: Path) -> None:
    config = tmp_path / "lb.yaml"
    config.write_text("routing_strategy: round_robin\nmin_healthy_nodes: 0\n")
    # Nothing configured: lb scans localhost; point that scan at a closed port.
    with lb_serve(env={"LB_CONFIG": str(config), "SCAN_PORTS": str(free_port())}) as (_, url):
        health = httpx.get(f"{url}/health")
        assert health.json() == {"status": "ok", "nodes_found": 0, "minimum_required": 0}


def test_demo_serves_chat_and_drains_on_sigterm() -> None:
    with lb_serve("--demo") as (process, url):
        assert httpx.get(f"{url}/health/readiness").status_code == 200
        assert httpx.get(f"{url}/health/liveliness").status_code == 200
        assert len(httpx.get(f"{url}/v1/models").json()["data"]) == 3
        body = {
            "model": "auto", "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        with httpx.Client(timeout=10) as client, client.stream(
            "POST", f"{url}/v1/chat/completions", json=body,
            headers={"x-mock-fault": "itl-ms=60,tokens=20"},
        ) as stream:
            events = stream.iter_lines()
            assert next(events).startswith("data: ")  # the stream is open
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # new connections are refused while draining
                try:
                    httpx.get(f"{url}/health/readiness", timeout=0.5)
                except httpx.ConnectError:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("lb kept accepting connections while draining")
            rest = [line for line in events if line]
            assert rest[-1] == "data: [DONE]"  # the stream in flight completed
            assert len(rest) == 20 + 1 + 1  # the role chunk was read above; tokens, finish, DONE
        assert process.wait(10) == 0


def test_readiness_is_503_while_draining() -> None:
    """A readiness check pipelined behind a stream is answered during the drain: 503."""
    with lb_serve("--demo") as (process, url):
        port = int(url.rsplit(":", 1)[1])
        body = b'{"model": "auto", "stream": true, "messages": [{"role": "user", "content": "x"}]}'
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: lb\r\n"
                b"x-mock-fault: itl-ms=50,tokens=10\r\ncontent-length: %d\r\n\r\n" % len(body)
                + body + b"GET /health/readiness HTTP/1.1\r\nhost: lb\r\n\r\n"
            )
            received = sock.recv(65536)  # the stream has begun
            process.send_signal(signal.SIGTERM)
            while chunk := sock.recv(65536):
                received += chunk
        stream, _, readiness = received.partition(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        assert stream.startswith(b"HTTP/1.1 200")
        assert readiness.startswith(b"HTTP/1.1 503"), readiness[:200]
        assert b'"draining"' in readiness and b"connection: close" in readiness
        assert process.wait(10) == 0


def test_drain_ends_what_outlives_the_grace_with_an_error_event() -> None:
    with lb_serve("--demo", env={"LB_DRAIN_SECS": "0.3"}) as (process, url):
        body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(timeout=10) as client, client.stream(
            "POST", f"{url}/v1/chat/completions", json=body,
            headers={"x-mock-fault": "itl-ms=200,tokens=50"},
        ) as stream:
            events = stream.iter_lines()
            next(events)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            rest = [line for line in events if line]
        # Not a torn chunk: one error event saying why, then [DONE], then the body's end.
        assert rest[-1] == "data: [DONE]"
        assert '"code":"shutting_down"' in rest[-2], rest[-2:]
        assert not any('"error"' in line for line in rest[:-2])
        assert process.wait(10) == 0
        assert time.monotonic() - started < 3


def test_second_signal_exits_at_once() -> None:
    with lb_serve("--demo", env={"LB_DRAIN_SECS": "60"}) as (process, url):
        body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(timeout=10) as client, client.stream(
            "POST", f"{url}/v1/chat/completions", json=body,
            headers={"x-mock-fault": "itl-ms=500,tokens=50"},
        ) as stream:
            events = stream.iter_lines()  # kept: a dropped iterator closes the response
            next(events)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            assert process.poll() is None  # still draining
            process.send_signal(signal.SIGINT)
            assert process.wait(5) == 1


def test_mock_command() -> None:
    port = free_port()
    process = subprocess.Popen(
        [*LB, "mock", "--port", str(port), "--model", "m1", "--model", "m2", "--tokens", "3"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == f"lb mock listening on http://127.0.0.1:{port}"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["m1", "m2"]
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "m1", "messages": [{"role": "user", "content": "x"}]},
        ).json()
        assert answer["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)


def test_mock_bad_fault_is_exit_2() -> None:
    result = run_lb("mock", "--fault", "status=abc")
    assert result.returncode == 2 and "--fault" in result.stderr
