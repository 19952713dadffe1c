"""What lb costs in front of a node: throughput, added latency, CPU per request, memory per
open stream, and where the CPU time goes.

One run starts a mock node (`lb mock`) and lb in front of it (`lb serve`, log level warning),
both as subprocesses on 127.0.0.1, then measures, for non-stream and stream chat requests:

1. requests/s, median and p99 latency and errors at concurrency 16 and 64 (closed loop, `lb bench`),
   directly against the mock and through lb, with the same load;
2. added latency at concurrency 1, paired: each iteration times one request direct and the
   same request through lb (alternating which goes first), `lb bench --compare`; the
   median and p90 are taken over the per-pair differences;
3. lb's CPU time per request: utime+stime of the lb process (/proc/PID/stat) around each
   through-lb `lb bench` run, divided by the requests served;
4. 1,000 concurrent open streams through one lb (a slow mock: 20 tokens, 200 ms apart):
   lb's RSS before and at the peak, and whether every stream completed;
5. a py-spy profile of lb under the concurrency-16 load (non-stream and stream).

Each measurement is repeated (--reps, default 3) and reported as the median and the spread.

    python bench/proxy_bench.py            # the full run (about 10 minutes on 2 cores)
    python bench/proxy_bench.py --quick    # a smoke run (about a minute)

Results go to bench/results/proxy-YYYY-MM-DD.{md,json} (--out DIR to change) and the py-spy
flamegraphs to lb-profile-{nonstream,stream}.svg next to them. See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

HOST = "127.0.0.1"  # every target is local
MODEL = "bench-model"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello to the benchmark"}]
BODIES = {
    "non-stream": json.dumps({"model": MODEL, "messages": MESSAGES}, separators=(",", ":")),
    "stream": json.dumps(
        {"model": MODEL, "stream": True, "messages": MESSAGES}, separators=(",", ":")
    ),
}
MODES = ("non-stream", "stream")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
LB_BENCH = [sys.executable, "-m", "lb.cli", "bench"]  # run in REPO: this checkout's lb
CLK_TCK = os.sysconf("SC_CLK_TCK")
FD_LIMIT = 65536
TARGETS = {  # from the issue
    "cpu_ms_non_stream": 0.5,
    "cpu_ms_stream": 1.0,
    "added_median_ms": 1.0,
    "open_streams_rss_mb": 100.0,
}


@dataclass(frozen=True)
class Plan:
    reps: int
    requests: int  # per load run
    concurrencies: tuple[int, ...]
    pairs: int  # per paired run and mode
    warmup_pairs: int
    open_streams: int
    slow_tokens: int
    slow_itl_ms: float
    profile_secs: int
    tokens: int
    ttft_ms: float
    itl_ms: float


FULL = Plan(
    reps=3, requests=20_000, concurrencies=(16, 64), pairs=2000, warmup_pairs=100,
    open_streams=1000, slow_tokens=20, slow_itl_ms=200, profile_secs=15,
    tokens=8, ttft_ms=0, itl_ms=0,
)
QUICK = Plan(
    reps=1, requests=1000, concurrencies=(16, 64), pairs=200, warmup_pairs=20,
    open_streams=200, slow_tokens=10, slow_itl_ms=100, profile_secs=3,
    tokens=8, ttft_ms=0, itl_ms=0,
)


# --- small helpers -------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the repetitions of one figure."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def http_get_json(port: int, path: str, method: str = "GET") -> Any:
    """A one-off request with a fresh connection (for the mock's control endpoints)."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-length: 0\r\n"
            "connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        body = RawHTTP.dechunk(body)
    return json.loads(body) if body else None


def request_bytes(port: int, body: str, extra_headers: str = "") -> bytes:
    """A chat POST, as the raw clients send it (extra_headers: 'name: value\\r\\n' lines)."""
    data = body.encode()
    return (
        f"POST {CHAT} HTTP/1.1\r\nhost: {HOST}:{port}\r\n{extra_headers}"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    ).encode() + data


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine() -> dict[str, Any]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- subprocesses --------------------------------------------------------------------------


def lb_command() -> list[str]:
    """The `lb` console script of this interpreter (it execs python: same pid)."""
    script = Path(sys.executable).with_name("lb")
    if script.exists():
        return [str(script)]
    found = shutil.which("lb")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from lb.cli import main; sys.exit(main())"]


class Proc:
    """A subprocess that listens on a port; its output goes to a log file."""

    def __init__(self, name: str, argv: list[str], port: int, logdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = logdir / f"{name}-{port}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, timeout: float = 30.0) -> Proc:
        with open(self.log_path, "wb") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {self.port} in {timeout}s")

    def stop(self) -> None:
        p = self.popen
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def problems(self) -> list[str]:
        """Log lines at WARNING or above (lb runs at log level warning)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [
            line for line in text.splitlines()
            if any(word in line for word in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback"))
        ]


class Cluster:
    """The mock node and lb in front of it; stopped on exit."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []

    def mock(self, tokens: int, ttft_ms: float, itl_ms: float) -> Proc:
        port = free_port()
        argv = [
            *lb_command(), "mock", "--host", HOST, "--port", str(port), "--model", MODEL,
            "--tokens", str(tokens), "--ttft-ms", f"{ttft_ms:g}", "--itl-ms", f"{itl_ms:g}",
        ]
        proc = Proc("mock", argv, port, self.logdir).start()
        self.procs.append(proc)
        return proc

    def lb(self, node: Proc) -> Proc:
        port = free_port()
        argv = [
            *lb_command(), "serve", "--node", f"{HOST}:{node.port}", "--host", HOST,
            # warning: no access log lines unless asked for (LB_LOG_LEVEL=info, e.g. through
            # ab_cpu.py's --env, to measure with everything on)
            "--port", str(port), "--log-level", os.environ.get("LB_LOG_LEVEL", "warning"),
        ]
        proc = Proc("lb", argv, port, self.logdir).start()
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


# --- load: `lb bench` (closed loop, fixed concurrency) --------------------------------------


def _auth_header() -> list[str]:
    """`LB_BENCH_AUTHORIZATION=Bearer sk-...`: every request of the load carries that header
    (to measure API keys; an lb without keys passes it on to the mock, which ignores it)."""
    value = os.environ.get("LB_BENCH_AUTHORIZATION")
    return ["-H", f"Authorization: {value}"] if value else []


def lb_bench(port: int, mode: str, *args: str, timeout: float = 600.0) -> dict[str, Any]:
    """`lb bench` against 127.0.0.1:port sending BODIES[mode] (a one-line JSONL workload);
    its JSON report. It runs in its own process, so its CPU is neither lb's nor ours."""
    with tempfile.TemporaryDirectory() as tmp:
        workload = Path(tmp) / "workload.jsonl"
        workload.write_text(BODIES[mode] + "\n")
        argv = [
            *LB_BENCH, f"http://{HOST}:{port}", "--workload", str(workload),
            "--timeout", "20", *_auth_header(), *args, "--json", "-",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"lb bench failed ({done.returncode}): {done.stderr[-500:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def run_load(
    port: int, mode: str, concurrency: int, requests: int, *, cpu_pid: int | None = None
) -> dict[str, Any]:
    """`lb bench -c concurrency -n requests` POSTing the chat body. With cpu_pid, also lb's
    CPU seconds over the run."""
    cpu_before = cpu_seconds(cpu_pid) if cpu_pid else 0.0
    started = time.monotonic()
    report = lb_bench(port, mode, "-c", str(concurrency), "-n", str(requests),
                      timeout=60 + requests / 50)
    wall = time.monotonic() - started
    cpu = cpu_seconds(cpu_pid) - cpu_before if cpu_pid else math.nan
    ok = report["ok"]
    return {
        "mode": mode,
        "concurrency": concurrency,
        "requests": report["requests"],
        "ok": ok,
        "errors": report["requests"] - ok,
        "error_kinds": report["errors"],
        "rps": report["requests_per_s"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_ms_per_request": cpu * 1000 / ok if cpu_pid and ok else math.nan,
        "generator_cpu_ms_per_request": report["generator_cpu_ms_per_request"],
    }


# --- paired added latency at concurrency 1 -------------------------------------------------


class RawHTTP:
    """A minimal keep-alive HTTP/1.1 client on a blocking socket: the same few lines of code
    time both paths, so the client's own cost cancels out in each pair."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def payload(self, body: str) -> bytes:
        return request_bytes(self.port, body)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def request(self, payload: bytes) -> tuple[int, int]:
        """Send one request and read the whole response; (status, nanoseconds)."""
        buf = self.buf
        t0 = time.perf_counter_ns()
        self.sock.sendall(payload)
        while (end := buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(buf[:end]).lower()
        status = int(head[9:12])
        pos = end + 4
        at = head.find(b"content-length:")
        if at >= 0:
            need = pos + int(head[at + 15 :].split(b"\r\n", 1)[0])
            while len(buf) < need:
                self._fill()
            pos = need
        elif b"transfer-encoding: chunked" in head:
            while True:
                while (line_end := buf.find(b"\r\n", pos)) < 0:
                    self._fill()
                size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
                pos = line_end + 2 + size + 2  # data and its CRLF (no trailers after 0)
                while len(buf) < pos:
                    self._fill()
                if size == 0:
                    break
        else:
            raise ConnectionError("response without length: " + head[:200].decode("latin-1"))
        t1 = time.perf_counter_ns()
        del buf[:pos]
        return status, t1 - t0

    @staticmethod
    def dechunk(body: bytes) -> bytes:
        out, pos = [], 0
        while True:
            line_end = body.index(b"\r\n", pos)
            size = int(body[pos:line_end].split(b";")[0], 16)
            if size == 0:
                return b"".join(out)
            out.append(body[line_end + 2 : line_end + 2 + size])
            pos = line_end + 2 + size + 2

    def close(self) -> None:
        self.sock.close()


def run_paired(direct_port: int, lb_port: int, mode: str, pairs: int, warmup: int,
               time_limit: float = 120.0) -> dict[str, Any]:
    """`lb bench --compare`: each request through lb and direct, alternately first, one pair at
    a time; percentiles of the per-pair differences."""
    report = lb_bench(
        lb_port, mode, "-c", "1", "-n", str(pairs), "-d", str(time_limit),
        "--warmup", str(warmup), "--compare", f"http://{HOST}:{direct_port}",
        timeout=time_limit + 120,
    )
    added = report["added_latency_ms"]
    return {
        "mode": mode,
        "pairs": added["count"],
        "errors": report["requests"] - added["count"],
        "added_p50_ms": added["p50"],
        "added_p90_ms": added["p90"],
        "added_p99_ms": added["p99"],
        "direct_p50_ms": report["compare"]["latency_ms"]["p50"],
        "lb_p50_ms": report["latency_ms"]["p50"],
    }


# --- many concurrent open streams ----------------------------------------------------------


async def _open_streams(
    lb: Proc, mock: Proc, count: int, expected_events: int, time_limit: float
) -> dict[str, Any]:
    payload = request_bytes(lb.port, BODIES["stream"])
    outcomes: collections.Counter[str] = collections.Counter()
    durations: list[float] = []
    rss_samples: list[int] = []
    running = True
    all_done = trio.Event()
    remaining = count

    async def one() -> None:
        nonlocal remaining
        started = trio.current_time()
        outcome = "timeout"
        with trio.move_on_after(time_limit):
            try:
                stream = await trio.open_tcp_stream(HOST, lb.port)
            except OSError as exc:
                outcome = f"connect: {exc.strerror or exc!r}"
            else:
                try:
                    outcome = await _read_stream(stream, payload, expected_events)
                finally:
                    await trio.aclose_forcefully(stream)
        outcomes[outcome] += 1
        if outcome == "ok":
            durations.append(trio.current_time() - started)
        remaining -= 1
        if not remaining:
            all_done.set()

    async def sample() -> None:
        while running:
            rss_samples.append(_rss_kb(lb.pid))
            await trio.sleep(0.05)

    before_kb = _rss_kb(lb.pid)
    cpu_before = cpu_seconds(lb.pid)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        for _ in range(count):
            nursery.start_soon(one)
        await all_done.wait()
        running = False
    elapsed = trio.current_time() - t0
    cpu = cpu_seconds(lb.pid) - cpu_before
    memory = memory_kb(lb.pid)
    stats = http_get_json(mock.port, "/mock/stats")
    peak_kb = max(rss_samples, default=before_kb)
    return {
        "streams": count,
        "completed": outcomes.get("ok", 0),
        "failed": count - outcomes.get("ok", 0),
        "failures": {k: v for k, v in outcomes.items() if k != "ok"},
        "peak_concurrent_at_node": stats.get("max_concurrent"),
        "rss_before_mb": before_kb / 1024,
        "rss_peak_mb": peak_kb / 1024,
        "rss_growth_mb": (peak_kb - before_kb) / 1024,
        "rss_after_mb": memory.get("VmRSS", 0) / 1024,
        "hwm_mb": memory.get("VmHWM", 0) / 1024,
        "elapsed_s": elapsed,
        "stream_p50_s": pct(durations, 0.5),
        "stream_max_s": max(durations, default=math.nan),
        "lb_cpu_ms_per_stream": cpu * 1000 / count,
        "events_per_stream": expected_events,
    }


def _rss_kb(pid: int) -> int:
    return memory_kb(pid).get("VmRSS", 0)


async def _read_stream(stream: trio.SocketStream, payload: bytes, expected_events: int) -> str:
    try:
        await stream.send_all(payload)
        buf = bytearray()
        while not buf.endswith(b"\r\n0\r\n\r\n"):
            data = await stream.receive_some(65536)
            if not data:
                return "closed early"
            buf += data
    except (trio.BrokenResourceError, OSError) as exc:
        return f"io: {exc!r}"[:80]
    if not buf.startswith(b"HTTP/1.1 200"):
        return "status " + bytes(buf[9:12]).decode("latin-1")
    events = buf.count(b"data: ")
    if events != expected_events or b"data: [DONE]" not in buf:
        return f"{events} events"
    return "ok"


def run_open_streams(
    cluster: Cluster, plan: Plan, profile_to: Path | None = None, syscalls: bool = False
) -> dict[str, Any]:
    """A fresh slow mock and a fresh lb; warm lb up, then open `plan.open_streams` at once.
    Afterwards, with profile_to, profile lb (py-spy) during two more such batches, and with
    syscalls, count its syscalls during one more."""
    mock = cluster.mock(plan.slow_tokens, 0, plan.slow_itl_ms)
    lb = cluster.lb(mock)
    try:
        client = RawHTTP(lb.port)
        try:  # warm-up (lazy imports, first connections), with the mock's delays turned off
            for mode in MODES:
                payload = request_bytes(lb.port, BODIES[mode], "x-mock-fault: itl-ms=0\r\n")
                for _ in range(5):
                    client.request(payload)
        finally:
            client.close()
        http_get_json(mock.port, "/mock/reset", "POST")
        time.sleep(0.2)
        stream_secs = plan.slow_tokens * plan.slow_itl_ms / 1000
        result = trio.run(
            _open_streams, lb, mock, plan.open_streams, plan.slow_tokens + 3, stream_secs + 60
        )
        events = plan.slow_tokens + 3

        def batch() -> dict[str, Any]:
            again: dict[str, Any] = trio.run(
                _open_streams, lb, mock, plan.open_streams, events, stream_secs + 60
            )
            result["batches"] = result.get("batches", 1) + 1
            result["rss_after_batches_mb"] = again["rss_after_mb"]
            return again

        if profile_to is not None:

            def described() -> str:
                again = batch()
                return f"{again['completed']} of {again['streams']} streams completed"

            result["profile"] = profile_while(
                lb, "slow-streams", math.ceil(stream_secs) + 2, profile_to, described
            )
        if syscalls:

            def counted() -> tuple[int, int]:
                again = batch()
                return again["completed"] * events, again["failed"]

            result["syscalls"] = strace_counts(
                lb, f"slow stream (per event, {events} a stream)", counted, cluster.logdir
            )
        result["lb_log_problems"] = lb.problems()[:10]
        return result
    finally:
        cluster.stop(lb)
        cluster.stop(mock)


# --- profile -------------------------------------------------------------------------------


def run_profile(lb: Proc, mode: str, seconds: int, outdir: Path) -> dict[str, Any]:
    """py-spy on lb under `lb bench`'s concurrency-16 load of `mode` requests."""

    def load() -> str:
        report = lb_bench(lb.port, mode, "-c", "16", "-d", str(seconds + 1),
                          timeout=seconds + 60)
        return f"lb bench -c 16: {report['requests_per_s']:.0f} req/s under py-spy"

    stem = "nonstream" if mode == "non-stream" else "stream"
    return profile_while(lb, stem, seconds, outdir, load)


def profile_while(
    lb: Proc, stem: str, seconds: int, outdir: Path, load: Callable[[], str]
) -> dict[str, Any]:
    """Two py-spy recordings of lb while `load()` runs: raw stacks (summarised here) and a
    flamegraph (outdir/lb-profile-STEM.svg)."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        return {"error": "py-spy not found"}
    svg = outdir / f"lb-profile-{stem}.svg"
    out: dict[str, Any] = {"svg": svg.name}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        for fmt, path in (("raw", raw), ("flamegraph", svg)):
            argv = [
                pyspy, "record", "--pid", str(lb.pid), "--duration", str(seconds),
                "--rate", "200", "--nolineno", "--format", fmt, "-o", str(path),
            ]
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                time.sleep(0.5)  # attach
                described = load()
                _, err = spy.communicate(timeout=seconds + 60)
            finally:
                if spy.poll() is None:
                    spy.kill()
                    spy.wait()
            if spy.returncode != 0:
                out["error"] = err.decode(errors="replace")[-500:]
                return out
            if fmt == "raw":
                out["command"] = shlex.join(argv).replace(str(path), f"{stem}.raw")
                out["load"] = described
                out.update(summarise_stacks(raw.read_text()))
    return out


def _frame_parts(frame: str) -> tuple[str, str]:
    """'func (path/file.py)' -> ('func', 'path/file.py')."""
    name, _, rest = frame.partition(" (")
    return name, rest.rstrip(")")


# Leaf functions that are (almost) all time in the kernel: own time there is a syscall.
_SYSCALL_LEAVES = {
    "_SocketType._nonblocking_helper": "kernel: socket send/recv/accept",
    "EpollIOManager.get_events": "kernel: epoll_wait",
    "_Conn.readable": "kernel: poll (idle-connection check)",
}


def component(path: str, function: str = "") -> str:
    """Which part of the stack a leaf frame belongs to: a syscall, a third-party package, a
    sub-package of lb, or the standard library."""
    if function in _SYSCALL_LEAVES:
        return _SYSCALL_LEAVES[function]
    parts = _short(path).split("/")
    if parts[0] == "lb":
        return ".".join(parts[:2]).removesuffix(".py") if len(parts) > 1 else "lb"
    if parts[0] in ("", "<frozen"):
        return "other"
    if len(parts) > 1:
        return {"attr": "attrs", "httpcore": "httpx"}.get(parts[0], parts[0])
    return "stdlib"


def summarise_stacks(text: str, top: int = 20) -> dict[str, Any]:
    """Own time per function and per component, inclusive time per lb function, from
    py-spy's raw (collapsed) stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_component: collections.Counter[str] = collections.Counter()
    by_caller: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if " (" in f]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        name, path = _frame_parts(leaf)
        key = f"{name} ({_short(path)})"
        own[key] += count
        leaf_component = component(path, name)
        by_component[leaf_component] += count
        seen = set()
        caller = "(no lb frame)"
        for frame in frames:
            name, path = _frame_parts(frame)
            if component(path).startswith("lb.") and not path.endswith("lb/cli.py"):
                key = f"{name} ({_short(path)})"
                caller = key
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += count
        if not leaf_component.startswith("lb"):
            by_caller[f"{caller} → {leaf_component}"] += count

    def share(counter: collections.Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"function": k, "samples": v, "percent": 100 * v / total if total else 0}
            for k, v in counter.most_common(n)
        ]

    return {
        "samples": total,
        "own": share(own, top),
        "components": share(by_component, 20),
        "lb_inclusive": share(inclusive, top),
        "by_lb_caller": share(by_caller, top),
    }


def _short(path: str) -> str:
    p = path.replace("\\", "/")
    for marker in ("site-packages/", "lib/python3."):
        if marker in p:
            p = p.split(marker, 1)[1]
            if marker == "lib/python3.":
                p = p.split("/", 1)[1] if "/" in p else p
    if "/lb/" in p:
        p = "lb/" + p.rsplit("/lb/", 1)[1]
    return p


# --- syscalls per request ------------------------------------------------------------------


def run_syscalls(lb: Proc, mode: str, requests: int, logdir: Path) -> dict[str, Any]:
    """lb's syscalls per request during `requests` requests at concurrency 16."""

    def load() -> tuple[int, int]:
        run = run_load(lb.port, mode, 16, requests)
        return run["ok"], run["errors"]

    return strace_counts(lb, f"{mode} (per request)", load, logdir)


def strace_counts(
    lb: Proc, label: str, load: Callable[[], tuple[int, int]], logdir: Path
) -> dict[str, Any]:
    """`strace -c -f` attached to lb while `load()` runs; load returns (units served, errors)
    and the counts are per unit (strace slows lb down; only the counts matter)."""
    strace = shutil.which("strace")
    if strace is None:
        return {"error": "strace not found"}
    out_file = logdir / f"strace-{len(list(logdir.glob('strace-*')))}.txt"
    tracer = subprocess.Popen(
        [strace, "-c", "-f", "-p", str(lb.pid), "-o", str(out_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # attach
        served, errors = load()
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    calls: dict[str, float] = {}
    failed: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in out_file.read_text().splitlines():
            tokens = line.split()
            if len(tokens) not in (5, 6) or not tokens[3].isdigit() or tokens[-1] == "total":
                continue
            calls[tokens[-1]] = int(tokens[3]) / max(1, served)
            if len(tokens) == 6:
                failed[tokens[-1]] = int(tokens[4]) / max(1, served)
    return {
        "label": label,
        "served": served,
        "errors": errors,
        "per_unit": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        "failed_per_unit": failed,
        "total_per_unit": sum(calls.values()),
    }


# --- the run -------------------------------------------------------------------------------


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT if hard == resource.RLIM_INFINITY else min(FD_LIMIT, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by subprocesses


def measure(plan: Plan, outdir: Path, profile: bool, syscalls: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "throughput": [], "paired": [], "open_streams": [], "profile": {}, "syscalls": {},
    }
    logdir = Path(tempfile.mkdtemp(prefix="lb-bench-"))
    cluster = Cluster(logdir)
    try:
        mock = cluster.mock(plan.tokens, plan.ttft_ms, plan.itl_ms)
        lb = cluster.lb(mock)
        results["lb_pid_cmdline"] = Path(f"/proc/{lb.pid}/cmdline").read_bytes().replace(
            b"\0", b" "
        ).decode(errors="replace").strip()
        log(f"mock on :{mock.port}, lb on :{lb.port} (pid {lb.pid}); logs in {logdir}")
        for mode in MODES:  # warm both paths up
            run_load(mock.port, mode, 16, min(2000, plan.requests))
            run_load(lb.port, mode, 16, min(2000, plan.requests))
        for rep in range(plan.reps):
            for mode in MODES:
                paired = run_paired(mock.port, lb.port, mode, plan.pairs, plan.warmup_pairs)
                paired["rep"] = rep
                results["paired"].append(paired)
                log(
                    f"rep {rep} paired {mode}: added p50 {paired['added_p50_ms']:.3f} ms, "
                    f"p90 {paired['added_p90_ms']:.3f} ms ({paired['pairs']} pairs)"
                )
                for c in plan.concurrencies:
                    for target, port in (("direct", mock.port), ("lb", lb.port)):
                        run = run_load(
                            port, mode, c, plan.requests,
                            cpu_pid=lb.pid if target == "lb" else None,
                        )
                        run.update(rep=rep, target=target)
                        results["throughput"].append(run)
                        log(
                            f"rep {rep} {mode} c={c} {target}: {run['rps']:.0f} req/s, "
                            f"p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms, "
                            f"errors {run['errors']}, lb CPU {run['cpu_ms_per_request']:.3f} ms/req"
                        )
        if profile:
            for mode in MODES:
                log(f"profiling lb under c=16 {mode} load ({plan.profile_secs}s x 2)")
                results["profile"][mode] = run_profile(lb, mode, plan.profile_secs, outdir)
        if syscalls:
            for mode in MODES:
                log(f"counting lb's syscalls under c=16 {mode} load (strace -c)")
                results["syscalls"][mode] = run_syscalls(
                    lb, mode, min(2000, plan.requests), logdir
                )
        results["lb_log_problems"] = lb.problems()[:20]
        cluster.stop(lb)
        cluster.stop(mock)
        for rep in range(plan.reps):
            run = run_open_streams(
                cluster, plan, outdir if profile and rep == 0 else None, syscalls and rep == 0
            )
            if "profile" in run:
                results["profile"]["slow streams"] = run.pop("profile")
            if "syscalls" in run:
                results["syscalls"]["slow streams"] = run.pop("syscalls")
            run["rep"] = rep
            results["open_streams"].append(run)
            log(
                f"rep {rep} {run['streams']} open streams: {run['completed']} completed, "
                f"RSS {run['rss_before_mb']:.1f} -> {run['rss_peak_mb']:.1f} MB "
                f"(+{run['rss_growth_mb']:.1f}), node saw {run['peak_concurrent_at_node']} at once"
            )
    finally:
        cluster.close()
    return results


def summarise(plan: Plan, results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"throughput": [], "paired": [], "cpu": []}
    for mode in MODES:
        for c in plan.concurrencies:
            for target in ("direct", "lb"):
                runs = [
                    r for r in results["throughput"]
                    if r["mode"] == mode and r["concurrency"] == c and r["target"] == target
                ]
                summary["throughput"].append({
                    "mode": mode, "concurrency": c, "target": target, "runs": len(runs),
                    "rps": spread([r["rps"] for r in runs]),
                    "p50_ms": spread([r["p50_ms"] for r in runs]),
                    "p99_ms": spread([r["p99_ms"] for r in runs]),
                    "errors": sum(r["errors"] for r in runs),
                    "requests": sum(r["requests"] for r in runs),
                })
                if target == "lb":
                    summary["cpu"].append({
                        "mode": mode, "concurrency": c,
                        "cpu_ms_per_request": spread([r["cpu_ms_per_request"] for r in runs]),
                        "requests_per_run": plan.requests,
                    })
        runs = [r for r in results["paired"] if r["mode"] == mode]
        summary["paired"].append({
            "mode": mode, "runs": len(runs), "pairs_per_run": plan.pairs,
            **{key: spread([r[key] for r in runs]) for key in (
                "added_p50_ms", "added_p90_ms", "added_p99_ms", "direct_p50_ms", "lb_p50_ms"
            )},
            "errors": sum(r["errors"] for r in runs),
        })
    streams = results["open_streams"]
    summary["open_streams"] = {
        "streams": plan.open_streams,
        "runs": len(streams),
        "completed_all": all(r["completed"] == r["streams"] for r in streams),
        "failed": sum(r["failed"] for r in streams),
        **{key: spread([r[key] for r in streams]) for key in (
            "rss_before_mb", "rss_peak_mb", "rss_growth_mb", "rss_after_mb",
            "peak_concurrent_at_node", "stream_p50_s", "stream_max_s", "lb_cpu_ms_per_stream",
        )},
    }

    def cpu(mode: str) -> float:
        return next(
            c["cpu_ms_per_request"]["median"] for c in summary["cpu"]
            if c["mode"] == mode and c["concurrency"] == 16
        ) if 16 in plan.concurrencies else math.nan

    def added(mode: str) -> float:
        return next(p["added_p50_ms"]["median"] for p in summary["paired"] if p["mode"] == mode)

    errors = sum(t["errors"] for t in summary["throughput"]) + sum(
        p["errors"] for p in summary["paired"]
    ) + summary["open_streams"]["failed"]
    summary["targets"] = [
        _target("lb CPU per non-stream request (c=16)", cpu("non-stream"), "ms",
                TARGETS["cpu_ms_non_stream"]),
        _target(f"lb CPU per {plan.tokens + 1}-event stream (c=16)", cpu("stream"), "ms",
                TARGETS["cpu_ms_stream"]),
        _target("added median latency, non-stream (c=1, paired)", added("non-stream"), "ms",
                TARGETS["added_median_ms"]),
        _target("added median latency, stream (c=1, paired)", added("stream"), "ms",
                TARGETS["added_median_ms"]),
        _target(f"RSS growth with {plan.open_streams} open streams",
                summary["open_streams"]["rss_growth_mb"]["median"], "MB",
                TARGETS["open_streams_rss_mb"]),
        {"figure": "errors (all runs)", "value": errors, "unit": "", "target": 0,
         "met": errors == 0},
    ]
    return summary


def _target(figure: str, value: float, unit: str, target: float) -> dict[str, Any]:
    return {"figure": figure, "value": value, "unit": unit, "target": target,
            "met": bool(value <= target)}


# --- report --------------------------------------------------------------------------------


def _f(s: dict[str, float], digits: int = 2) -> str:
    """'median [min, max]'."""
    if math.isnan(s["median"]):
        return "n/a"
    if s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def report(meta: dict[str, Any], plan: Plan, results: dict[str, Any],
           summary: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        f"# lb proxy benchmark — {meta['date']}",
        "",
        f"Command: `{meta['command']}` (git {meta['git']}, {meta['elapsed_min']:.1f} min)",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']} "
        f"({m['implementation']}), Linux {m['kernel']}; load average {meta['load_before']} "
        f"before, {meta['load_after']} after. A shared, noisy machine: load generator, mock and "
        "lb share the same cores, so compare the direct and lb rows of one table, not these "
        "figures with another machine's.",
        "",
        f"Setup: `lb mock --tokens {plan.tokens} --ttft-ms {plan.ttft_ms:g} --itl-ms "
        f"{plan.itl_ms:g}` (a stream is 1 role + {plan.tokens} token + 1 finish events + "
        f"[DONE]); `lb serve --node 127.0.0.1:PORT --log-level warning`, default settings. "
        f"Every figure is the median over {plan.reps} repetitions, with [min, max] across them.",
        "",
        "## Against the targets",
        "",
        "| figure | median | target | met |",
        "| --- | --- | --- | --- |",
    ]
    for t in summary["targets"]:
        value = t["value"] if isinstance(t["value"], int) else f"{t['value']:.3f}"
        lines.append(
            f"| {t['figure']} | {value} {t['unit']} | ≤ {t['target']} {t['unit']} | "
            f"{'yes' if t['met'] else '**no**'} |"
        )
    lines += [
        "",
        f"## Throughput and latency (lb bench, closed loop, {plan.requests:,} requests per run)",
        "",
        "Latency of a stream is until its last byte. lb CPU is utime+stime of the lb process "
        "over the run divided by the requests served.",
        "",
        "| request | conc. | path | req/s | p50 ms | p99 ms | errors | lb CPU ms/req |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    cpu = {(c["mode"], c["concurrency"]): c["cpu_ms_per_request"] for c in summary["cpu"]}
    for t in summary["throughput"]:
        cpu_cell = _f(cpu[(t["mode"], t["concurrency"])], 3) if t["target"] == "lb" else ""
        lines.append(
            f"| {t['mode']} | {t['concurrency']} | {t['target']} | {_f(t['rps'], 0)} | "
            f"{_f(t['p50_ms'])} | {_f(t['p99_ms'])} | {t['errors']} | {cpu_cell} |"
        )
    lines += [
        "",
        f"## Added latency at concurrency 1 (paired, {plan.pairs:,} pairs per run)",
        "",
        "Each pair: the same request direct and through lb, back to back on kept-alive "
        "connections, order alternating; the percentiles are of the per-pair differences.",
        "",
        "| request | added p50 ms | added p90 ms | added p99 ms | direct p50 ms | via lb p50 ms "
        "| errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in summary["paired"]:
        lines.append(
            f"| {p['mode']} | {_f(p['added_p50_ms'], 3)} | {_f(p['added_p90_ms'], 3)} | "
            f"{_f(p['added_p99_ms'], 3)} | {_f(p['direct_p50_ms'], 3)} | "
            f"{_f(p['lb_p50_ms'], 3)} | {p['errors']} |"
        )
    o = summary["open_streams"]
    lines += [
        "",
        f"## {plan.open_streams:,} concurrent open streams through one lb",
        "",
        f"A fresh `lb mock --tokens {plan.slow_tokens} --itl-ms {plan.slow_itl_ms:g}` and a "
        f"fresh lb per run, warmed up with 10 requests; then {plan.open_streams:,} streaming "
        "requests opened at once (one connection each) and read to the end. RSS is lb's VmRSS "
        "sampled every 50 ms.",
        "",
        "| figure | median [min, max] |",
        "| --- | --- |",
        f"| streams completed | {'all' if o['completed_all'] else 'NOT all'} "
        f"({o['failed']} failed over {o['runs']} runs) |",
        f"| most streams open at the node at once | {_f(o['peak_concurrent_at_node'], 0)} |",
        f"| lb RSS before, MB | {_f(o['rss_before_mb'], 1)} |",
        f"| lb RSS at the peak, MB | {_f(o['rss_peak_mb'], 1)} |",
        f"| **RSS growth, MB** | {_f(o['rss_growth_mb'], 1)} |",
        f"| lb RSS after all closed, MB | {_f(o['rss_after_mb'], 1)} |",
        *[
            f"| lb RSS after {r['batches']} such batches (run {r['rep'] + 1}), MB | "
            f"{r['rss_after_batches_mb']:.1f} |"
            for r in results["open_streams"] if "rss_after_batches_mb" in r
        ],
        f"| stream duration p50 / max, s | {_f(o['stream_p50_s'])} / {_f(o['stream_max_s'])} |",
        f"| lb CPU ms per stream ({plan.slow_tokens + 3} events, each its own read) | "
        f"{_f(o['lb_cpu_ms_per_stream'], 3)} |",
        f"| lb CPU ms per event | "
        f"{o['lb_cpu_ms_per_stream']['median'] / (plan.slow_tokens + 3):.3f} |",
    ]
    failures = [r["failures"] for r in results["open_streams"] if r["failures"]]
    if failures:
        lines += ["", f"Failures: `{failures}`"]
    lines += ["", "## Where the time goes", ""]
    for mode, prof in results["profile"].items():
        lines += _profile_section(mode, prof)
    if results["syscalls"]:
        lines += _syscall_section(results["syscalls"])
    problems = results.get("lb_log_problems") or []
    lines += [
        "",
        "## lb log",
        "",
        f"{len(problems)} warning/error lines during the load runs"
        + (":" if problems else "."),
    ]
    lines += [f"    {p}" for p in problems[:10]]
    return "\n".join(lines) + "\n"


def _profile_section(mode: str, prof: dict[str, Any]) -> list[str]:
    if "error" in prof:
        return [f"Profile of {mode} failed: `{prof['error']}`", ""]
    what = {
        "non-stream": "non-stream requests, lb bench -c 16",
        "stream": "9-event streams (read at once), lb bench -c 16",
        "slow streams": "open streams, every event its own read (the open-streams setup)",
    }.get(mode, mode)
    out = [
        f"### {what}",
        "",
        f"{prof['samples']} samples; flamegraph [{prof['svg']}]({prof['svg']}); "
        f"{prof.get('load', '')}.",
        "",
        f"`{prof['command']}`; the same again with `--format flamegraph`.",
        "",
        "By component (own time, the leaf frame's source file; C code such as orjson, socket "
        "syscalls and epoll counts toward the Python function that called it):",
        "",
        "| component | % of samples |",
        "| --- | --- |",
    ]
    out += [f"| {c['function']} | {c['percent']:.1f} |" for c in prof["components"]]
    out += ["", "Top functions by own time:", "", "| function | % |", "| --- | --- |"]
    out += [f"| `{c['function']}` | {c['percent']:.1f} |" for c in prof["own"][:15]]
    out += ["", "lb functions by inclusive time:", "", "| function | % |", "| --- | --- |"]
    out += [f"| `{c['function']}` | {c['percent']:.1f} |" for c in prof["lb_inclusive"][:12]]
    out += [
        "", "Time outside lb's own code (h11, trio, kernel, stdlib), by the innermost lb "
        "function on the stack — who pays for it:", "",
        "| lb function → component | % |", "| --- | --- |",
    ]
    out += [f"| `{c['function']}` | {c['percent']:.1f} |" for c in prof["by_lb_caller"][:12]]
    return [*out, ""]


def _syscall_section(syscalls: dict[str, Any]) -> list[str]:
    runs = [r for r in syscalls.values() if "error" not in r]
    if not runs:
        return [f"Syscall counts failed: `{syscalls}`", ""]
    names: list[str] = []
    for run in runs:
        names += [n for n in run["per_unit"] if n not in names]
    out = [
        "### lb's syscalls (strace -c -f)",
        "",
        "Counts per request under lb bench -c 16, and per event for the slow streams of the "
        "open-streams setup ("
        + ", ".join(f"{r['label']}: {r['served']:,}" for r in runs) + ").",
        "",
        "| syscall | " + " | ".join(r["label"] for r in runs) + " |",
        "| --- |" + " --- |" * len(runs),
    ]
    for name in names:
        if all(r["per_unit"].get(name, 0.0) < 0.01 for r in runs):
            continue
        cells = []
        for run in runs:
            n = run["per_unit"].get(name, 0.0)
            failed = run["failed_per_unit"].get(name, 0.0)
            cells.append(f"{n:.2f}" + (f" ({failed:.2f} failed)" if failed >= 0.01 else ""))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("| **total** | " + " | ".join(f"{r['total_per_unit']:.2f}" for r in runs) + " |")
    return [*out, ""]


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent, timeout=10, check=False,
        ).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop the subprocesses."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous: Callable[..., Any] | int | None = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each figure")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument("--no-strace", action="store_true", help="skip the syscall counts")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.reps is not None:
        plan = Plan(**{**asdict(plan), "reps": max(1, args.reps)})
    raise_fd_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    meta: dict[str, Any] = {
        "date": date,
        "command": shlex.join(["python", "bench/proxy_bench.py", *sys.argv[1:]]),
        "git": git_rev(),
        "machine": machine(),
        "load_before": loadavg(),
        "plan": asdict(plan),
    }
    started = time.monotonic()
    with terminate_on_sigterm():
        results = measure(
            plan, args.out, profile=not args.no_profile, syscalls=not args.no_strace
        )
    meta["elapsed_min"] = (time.monotonic() - started) / 60
    meta["load_after"] = loadavg()
    summary = summarise(plan, results)
    stem = f"proxy-{date}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "results": results}, indent=2) + "\n"
    )
    text = report(meta, plan, results, summary)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    log(f"wrote {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
