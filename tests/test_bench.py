"""lb bench against real servers: the runner's timing on trio's autojump clock (a mock node on
a real socket), then `lb bench` itself as a subprocess against in-process mocks and lb."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from lb.bench.runner import Plan, measure, run
from lb.bench.schedule import StopRule, open_loop_schedule
from lb.bench.wire import Target
from lb.bench.workloads import BuiltIn
from tests.harness import start_lb, start_mock


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_closed_loop_sends_the_next_request_when_the_last_ended(
    autojump_clock: Any, nursery: trio.Nursery,
) -> None:
    mock = await start_mock(nursery, ttft_ms=1000)
    result = await run(Plan(url=mock.url, workload=BuiltIn(), stop=StopRule(requests=4)))
    assert [round(s.start, 3) for s in result.samples] == [0.0, 1.0, 2.0, 3.0]
    assert all(s.latency == pytest.approx(1.0, abs=1e-3) for s in result.samples)
    assert result.elapsed == pytest.approx(4.0, abs=1e-2)
    assert await mock.chats() == 4


async def test_an_open_loop_sends_on_its_schedule_whatever_the_answers_take(
    autojump_clock: Any, nursery: trio.Nursery,
) -> None:
    # Answers take 1 s and arrive at 2/s: a closed loop of 1 would fall behind, the open
    # loop sends each at its scheduled time, with several in flight.
    mock = await start_mock(nursery, ttft_ms=1000)
    plan = Plan(url=mock.url, workload=BuiltIn(), stop=StopRule(requests=12), rate=2.0,
                concurrency=None, seed=7)
    result = await run(plan)
    schedule = open_loop_schedule(2.0, 7, requests=12)
    assert sorted(s.start for s in result.samples) == pytest.approx(schedule, abs=1e-3)
    assert all(s.lag == pytest.approx(0.0, abs=1e-3) for s in result.samples)
    assert all(s.latency == pytest.approx(1.0, abs=1e-3) for s in result.samples)
    assert result.elapsed == pytest.approx(schedule[-1] + 1.0, abs=1e-2)


async def test_a_late_send_is_charged_from_its_scheduled_time(
    autojump_clock: Any, nursery: trio.Nursery,
) -> None:
    # Coordinated omission: a request the generator could only send 0.5 s late still counts
    # those 0.5 s.
    mock = await start_mock(nursery, ttft_ms=200)
    target = Target(mock.url, [(b"content-type", b"application/json")])
    request = BuiltIn().request(0)
    t0 = trio.current_time()
    await trio.sleep(0.5)
    sample = await measure(target, request, 0, t0, t0, 60.0)
    await target.aclose()
    assert sample.error is None
    assert sample.lag == pytest.approx(0.5, abs=1e-3)
    assert sample.latency == pytest.approx(0.7, abs=1e-3)


async def test_a_streams_ttft_gaps_and_tokens(autojump_clock: Any, nursery: trio.Nursery) -> None:
    mock = await start_mock(nursery, ttft_ms=1000, itl_ms=100, tokens=5)
    result = await run(Plan(url=mock.url, workload=BuiltIn(stream=True),
                            stop=StopRule(requests=1)))
    [sample] = result.samples
    assert sample.error is None
    assert sample.ttft == pytest.approx(1.0, abs=1e-3)
    assert sample.tokens == 5
    assert sample.itls and all(gap <= 0.1 + 1e-3 for gap in sample.itls)
    assert sum(sample.itls) == pytest.approx(0.4, abs=1e-2)
    assert sample.latency == pytest.approx(1.4, abs=1e-2)


async def test_errors_are_counted_by_kind(autojump_clock: Any, nursery: trio.Nursery) -> None:
    failing = await start_mock(nursery, fault="status=503")
    result = await run(Plan(url=failing.url, workload=BuiltIn(), stop=StopRule(requests=3)))
    assert [s.error for s in result.samples] == ["http 503"] * 3
    hung = await start_mock(nursery, fault="hang=1")
    result = await run(Plan(url=hung.url, workload=BuiltIn(), stop=StopRule(requests=2),
                            timeout=5.0))
    assert [s.error for s in result.samples] == ["timeout"] * 2
    result = await run(Plan(url="http://127.0.0.1:1", workload=BuiltIn(),
                            stop=StopRule(requests=1)))
    assert [s.error for s in result.samples] == ["connect"]


# --- `lb bench`, the command, as a subprocess --------------------------------------------------


# The subprocess runs in a temporary directory: it must import this checkout's lb.
ROOT = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": ROOT, "OPENAI_API_KEY": ""}


async def lb_bench(*args: str, cwd: Path) -> dict[str, Any]:
    done = await trio.run_process(
        [sys.executable, "-m", "lb.cli", "bench", *args, "--json", "report.json"],
        cwd=cwd, env=ENV, capture_stdout=True, capture_stderr=True, check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"lb bench:" in done.stdout  # the table
    assert b"plots:" in done.stderr or not done.stderr  # no progress bar when not a terminal
    result: dict[str, Any] = json.loads((cwd / "report.json").read_bytes())
    return result


async def test_lb_bench_reports_what_the_node_served(nursery: trio.Nursery,
                                                     tmp_path: Path) -> None:
    mock = await start_mock(nursery)
    report = await lb_bench(mock.url, "-c", "4", "-n", "40", "--stream", cwd=tmp_path)
    assert report["requests"] == report["ok"] == 40
    assert report["errors"] == {}
    assert report["tokens"] == 40 * 8  # the mock's default answer: 8 tokens
    assert report["latency_ms"]["count"] == 40
    assert report["ttft_ms"]["p50"] <= report["latency_ms"]["p50"]
    assert await mock.chats() == 40


async def test_an_open_loop_run_with_plots(nursery: trio.Nursery, tmp_path: Path) -> None:
    mock = await start_mock(nursery)
    report = await lb_bench(mock.url, "--rate", "200", "-n", "30", "--workload", "multi-turn",
                            "--plot", "plots", cwd=tmp_path)
    assert report["loop"] == "open"
    assert report["requests"] == report["ok"] == 30
    assert report["send_lag_ms"]["count"] == 30
    assert await mock.chats() == 30
    for name in ("latency-cdf.png", "ttft-over-time.png", "throughput.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_compare_pairs_each_request_through_lb_with_the_node_direct(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    mock = await start_mock(nursery)
    lb = await start_lb(nursery, [mock])
    report = await lb_bench(lb.url, "--compare", mock.url, "-n", "20", "--workload", "random",
                            cwd=tmp_path)
    assert report["ok"] == report["compare"]["ok"] == 20
    assert report["added_latency_ms"]["count"] == 20
    assert await mock.chats() == 40  # each request both ways
    # The two of each pair are the same request, bytes for bytes.
    seen = [r["raw_body"] for r in await mock.requests() if r["path"] == "/v1/chat/completions"]
    assert len(seen) == 40  # the mock keeps the last 50 requests
    assert sorted(set(seen)) == sorted(seen[::2]) == sorted(seen[1::2])


async def test_against_runs_the_suite_on_each_upstream_in_turn(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    fast, failing = await start_mock(nursery), await start_mock(nursery, fault="status=500")
    (tmp_path / "nodes.yaml").write_text(f"nodes:\n  - {fast.url}\n  - url: {failing.url}\n")
    report = await lb_bench("--against", "nodes.yaml", "-n", "10", cwd=tmp_path)
    first, second = report["against"]
    assert (first["label"], first["ok"]) == (fast.key, 10)
    assert (second["label"], second["ok"], second["errors"]) == (failing.key, 0, {"http 500": 10})
    assert await fast.chats() == 10 and await failing.chats() == 10


async def test_a_bad_workload_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "w.jsonl").write_text('{"messages": []}\nnot json\n')
    done = await trio.run_process(
        [sys.executable, "-m", "lb.cli", "bench", "http://127.0.0.1:1", "--workload", "w.jsonl"],
        cwd=tmp_path, env=ENV, capture_stderr=True, check=False,
    )
    assert done.returncode == 2
    assert b"w.jsonl:2: not JSON" in done.stderr
