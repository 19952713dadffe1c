"""What a fleet of lb instances (Redis) costs: CPU per request with and without Redis, the time
from a node's death to its leaving every instance, and the idle CPU of an instance with 100
registered nodes.

One run measures, with every process on 127.0.0.1 and a private `redis-server` (a free port,
no persistence) started for it and stopped at the end:

1. lb's CPU per request (utime+stime from /proc/PID/stat around a `lb bench -c 16` run, as in
   proxy_bench.py), non-stream and 9-event streams, for `lb serve` without Redis and with
   REDIS_URL set; the two configurations alternate within each repetition (A B, A B, ...) so
   that the machine's noise hits both; medians, and the ratio Redis / none; the CPU of lb's
   worker threads (where its Redis calls run); and three controls of the method (two identical
   lbs, the order reversed, 10x the syncs);
2. node death: one mock node is SIGKILLed under 3 lb instances sharing Redis (plus one lb
   without Redis, watching the same node); every instance's `GET /v1/nodes` is polled every
   20 ms until each shows the node `healthy: false`; SCAN_INTERVAL=1 and HEALTH_FAIL_THRESHOLD=2,
   then (full run) the default SCAN_INTERVAL=10;
3. idle CPU of one lb with 100 registered nodes (100 `MockNode`s in one process, see
   many_mocks.py) over 60 s without traffic, without Redis and with Redis (leader and follower),
   and its RSS.

    python bench/fleet_bench.py            # the full run (about 17 minutes on 2 cores)
    python bench/fleet_bench.py --quick    # a smoke run (about 2 minutes)

Results go to bench/results/fleet-YYYY-MM-DD.{md,json} (--out DIR to change). See
bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from proxy_bench import (
    CLK_TCK,
    HOST,
    MODES,
    RESULTS_DIR,
    Cluster,
    Proc,
    RawHTTP,
    _f,
    cpu_seconds,
    free_port,
    git_rev,
    lb_command,
    loadavg,
    log,
    machine,
    memory_kb,
    raise_fd_limit,
    run_load,
    spread,
    terminate_on_sigterm,
)

BENCH_DIR = Path(__file__).resolve().parent
CPU_RATIO_TARGET = 1.05  # the issue: with Redis, CPU per request within 5% of the in-process one
POLL_SECS = 0.02  # node-death polling period
FLEET_SIZE = 3
FAIL_THRESHOLD = 2
DEFAULT_SCAN_INTERVAL = 10.0
DEFAULT_SYNC_SECS = 0.5
BOUNDED_WAIT = 60.0  # the longest any "wait until ..." may take


@dataclass(frozen=True)
class Plan:
    cpu_reps: int  # A B pairs of CPU-per-request runs, per mode
    requests: int  # per lb bench run
    warmup: int  # requests per mode and lb before the first measurement
    death_reps: int  # node deaths with SCAN_INTERVAL=1
    death_default_reps: int  # node deaths with the default SCAN_INTERVAL (0: skipped)
    idle_nodes: int
    idle_secs: float  # length of one idle window
    idle_settle_secs: float  # wait after start before an idle window
    idle_reps: int
    control_reps: int  # A B pairs of each control of section 1 (0: skipped)


FULL = Plan(
    cpu_reps=10, requests=10_000, warmup=2000, death_reps=10, death_default_reps=3,
    idle_nodes=100, idle_secs=60, idle_settle_secs=5, idle_reps=2, control_reps=10,
)
QUICK = Plan(
    cpu_reps=2, requests=2000, warmup=500, death_reps=2, death_default_reps=0,
    idle_nodes=100, idle_secs=10, idle_settle_secs=2, idle_reps=1, control_reps=1,
)

# Controls of the Redis-vs-none comparison (stream requests, the noisier mode): what the A B
# method reports when nothing differs, when the order is reversed, and with 10x the syncs.
# name: (what it checks, first lb's config, second lb's config); a config is extra env, with
# "REDIS" standing for the fleet's REDIS_URL and a fresh REDIS_PREFIX.
CONTROLS = {
    "identical": ("two identical lbs without Redis (second / first)", {}, {}),
    "redis-first": ("Redis first, then none (Redis / none)", {"REDIS": "1"}, {}),
    "fast-sync": ("none, then Redis with REDIS_SYNC_SECS=0.05, 10x the syncs (Redis / none)",
                  {}, {"REDIS": "1", "REDIS_SYNC_SECS": "0.05"}),
}


# --- processes -----------------------------------------------------------------------------


def lb_source() -> dict[str, Any]:
    """Which lb the subprocesses run (PYTHONPATH may point at a snapshot) and whether the
    working tree's lb/ differs from the commit."""
    import lb

    path = Path(lb.__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--", "lb"], capture_output=True, text=True,
            cwd=path.parent, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"lb_path": str(path), "lb_changes": None}
    changes = [line for line in done.stdout.splitlines() if line.strip()]
    return {"lb_path": str(path), "lb_changes": changes if done.returncode == 0 else None}


FOREIGN_MARKERS = (
    "proxy_bench.py", "ab_cpu.py", "upstream_client_cpu.py", "hey ", "lb.cli bench",
)
_foreign_seen: dict[int, dict[str, Any]] = {}


def _ancestors(pid: int) -> set[int]:
    out = set()
    for _ in range(64):
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
        except OSError:
            break
        pid = int(data[data.rindex(")") + 2 :].split()[1])
        if pid <= 1:
            break
        out.add(pid)
    return out


def note_foreign(section: str) -> None:
    """Remember other benchmarks (not started by this run) running now, for the report."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace"
            )
        except OSError:
            continue
        if not any(marker in cmd for marker in FOREIGN_MARKERS) or "fleet_bench" in cmd:
            continue
        pid = int(entry)
        if me in _ancestors(pid):
            continue
        seen = _foreign_seen.setdefault(pid, {"cmd": cmd[:160], "sections": []})
        if section not in seen["sections"]:
            seen["sections"].append(section)


def lb_setting_names() -> list[str]:
    """Every environment variable lb reads a setting from (cleared so that none leaks in)."""
    try:
        from lb.config import SETTINGS
    except Exception:  # a broken tree fails later, with lb's own message
        return ["LB_CONFIG"]
    return sorted({s.env for s in SETTINGS if s.env} | {"LB_CONFIG"})


def env_argv(env: dict[str, str]) -> list[str]:
    """`env K=V ...`: env execs the program, so the pid is lb's own."""
    return ["env", *[f"{k}={v}" for k, v in env.items()]] if env else []


def start(cluster: Cluster, name: str, argv: list[str], port: int) -> Proc:
    proc = Proc(name, argv, port, cluster.logdir).start()
    cluster.procs.append(proc)
    return proc


def start_lb(
    cluster: Cluster, name: str, env: dict[str, str], nodes: Sequence[int] = ()
) -> Proc:
    """`lb serve` on a free port with `env`; nodes as --node flags (or in LB_NODES in env)."""
    port = free_port()
    argv = [
        *env_argv(env), *lb_command(), "serve", "--host", HOST, "--port", str(port),
        "--log-level", "warning",
        *[arg for p in nodes for arg in ("--node", f"{HOST}:{p}")],
    ]
    return start(cluster, name, argv, port)


def start_mock(cluster: Cluster, name: str, port: int | None = None, tokens: int = 8) -> Proc:
    port = port or free_port()
    argv = [
        *lb_command(), "mock", "--host", HOST, "--port", str(port), "--model", "bench-model",
        "--tokens", str(tokens), "--ttft-ms", "0", "--itl-ms", "0",
    ]
    return start(cluster, name, argv, port)


def start_redis(cluster: Cluster) -> Proc:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server not found (apt-get install redis-server)")
    port = free_port()
    argv = [
        server, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
        "--logfile", "",
    ]
    return start(cluster, "redis", argv, port)


def stop(cluster: Cluster, *procs: Proc) -> None:
    for proc in procs:
        cluster.stop(proc)


def redis_env(redis: Proc, prefix: str, **more: Any) -> dict[str, str]:
    return {
        "REDIS_URL": f"redis://{HOST}:{redis.port}/0", "REDIS_PREFIX": prefix,
        **{k: str(v) for k, v in more.items()},
    }


def new_prefix() -> str:
    return f"lbbench:{uuid.uuid4().hex[:8]}:"


def get(port: int, path: str, timeout: float = 2.0) -> tuple[int, Any]:
    """A one-off GET with a fresh connection: (status, JSON body or None)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\nconnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head[9:12])
    if b"transfer-encoding: chunked" in head.lower():
        body = RawHTTP.dechunk(body)
    return status, json.loads(body) if body else None


def wait_until(what: str, check: Callable[[], bool], timeout: float = BOUNDED_WAIT) -> float:
    """Poll `check` every 50 ms until it holds; the seconds it took (RuntimeError past
    `timeout`)."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except (OSError, ValueError):
            pass
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def node_health(port: int, key: str) -> bool | None:
    """Whether lb on `port` shows node `key` healthy (None: not listed)."""
    _, body = get(port, "/v1/nodes")
    for node in body["nodes"]:
        if node["node"] == key:
            return bool(node["healthy"])
    return None


def healthy_count(port: int) -> int:
    _, body = get(port, "/v1/nodes")
    return sum(1 for node in body["nodes"] if node["healthy"])


def fleet_status(port: int) -> dict[str, Any]:
    _, body = get(port, "/health")
    return dict(body)


def wait_all_healthy(lbs: Sequence[Proc], count: int) -> None:
    wait_until(
        f"{count} healthy nodes on {len(lbs)} lb(s)",
        lambda: all(healthy_count(p.port) == count for p in lbs),
    )


def wait_fleet(lbs: Sequence[Proc]) -> None:
    """Until every instance counts all of them as live."""
    wait_until(
        f"a fleet of {len(lbs)}",
        lambda: all(len(fleet_status(p.port).get("instances", [])) == len(lbs) for p in lbs),
    )


def problems(procs: Sequence[Proc], expected: Sequence[str] = ()) -> list[str]:
    """Warning/error lines of lb's logs, except those containing one of `expected`."""
    out = []
    for proc in procs:
        out += [f"{proc.name}: {line}" for line in proc.problems()
                if not any(word in line for word in expected)]
    return out


# --- 1. CPU per request, Redis vs none -----------------------------------------------------


def run_cpu(plan: Plan, cluster: Cluster, redis: Proc) -> dict[str, Any]:
    mock = start_mock(cluster, "mock")
    lbs = {
        "none": start_lb(cluster, "lb-none", {}, [mock.port]),
        "redis": start_lb(cluster, "lb-redis", redis_env(redis, new_prefix()), [mock.port]),
    }
    out: dict[str, Any] = {
        "commands": {name: _cmdline(proc) for name, proc in lbs.items()},
        "mock_command": _cmdline(mock),
        "runs": [],
    }
    try:
        status = fleet_status(lbs["redis"].port)
        out["redis_health_before"] = status
        if status.get("redis") != "up":
            raise RuntimeError(f"lb with REDIS_URL does not see Redis: {status}")
        for mode in MODES:
            for proc in lbs.values():
                run_load(proc.port, mode, 16, plan.warmup)
        for rep in range(plan.cpu_reps):
            for mode in MODES:
                for name in ("none", "redis"):  # A B, every repetition
                    note_foreign("1. CPU per request")
                    run = cpu_run(lbs[name], mode, plan.requests)
                    run.update(rep=rep, config=name)
                    out["runs"].append(run)
                    log(
                        f"cpu rep {rep} {mode} {name}: {run['cpu_ms_per_request']:.3f} ms/req, "
                        f"{run['rps']:.0f} req/s, errors {run['errors']}"
                    )
        out["redis_health_after"] = fleet_status(lbs["redis"].port)
        out["rss_mb"] = {name: memory_kb(p.pid).get("VmRSS", 0) / 1024 for name, p in lbs.items()}
        out["log_problems"] = problems(list(lbs.values()))[:20]
    finally:
        stop(cluster, *lbs.values(), mock)
    return out


def cpu_run(lb: Proc, mode: str, requests: int) -> dict[str, Any]:
    """One `lb bench -c 16` run with lb's CPU per request, split into its main thread and the rest
    (worker threads)."""
    main_before = main_thread_cpu(lb.pid)
    run = run_load(lb.port, mode, 16, requests, cpu_pid=lb.pid)
    main_s = main_thread_cpu(lb.pid) - main_before
    threads_s = max(0.0, run["cpu_s"] - main_s)
    run.update(
        main_thread_cpu_s=main_s, threads_cpu_s=threads_s,
        threads_cpu_ms_per_request=threads_s * 1000 / run["ok"] if run["ok"] else math.nan,
    )
    return run


def run_controls(plan: Plan, cluster: Cluster, redis: Proc) -> dict[str, Any]:
    """Each control: a fresh mock and two fresh lbs, `plan.control_reps` A B pairs of stream
    runs; the paired ratio second / first (or Redis / none)."""
    out: dict[str, Any] = {}
    for key, (what, first_env, second_env) in CONTROLS.items():
        mock = start_mock(cluster, "mock")
        lbs = []
        for i, extra in enumerate((first_env, second_env)):
            env = {k: v for k, v in extra.items() if k != "REDIS"}
            if "REDIS" in extra:
                env = {**redis_env(redis, new_prefix()), **env}
            lbs.append(start_lb(cluster, f"{key}-{i}", env, [mock.port]))
        try:
            for proc in lbs:
                run_load(proc.port, "stream", 16, plan.warmup)
            pairs = []
            for _ in range(plan.control_reps):
                note_foreign("1b. controls")
                a, b = (cpu_run(proc, "stream", plan.requests)["cpu_ms_per_request"]
                        for proc in lbs)
                pairs.append((a, b))
            invert = key == "redis-first"  # report Redis / none
            ratios = [(a / b if invert else b / a) for a, b in pairs if a > 0 and b > 0]
            out[key] = {
                "what": what,
                "commands": [_cmdline(p) for p in lbs],
                "pairs_cpu_ms": pairs,
                "ratio": spread(ratios),
                "above_1": sum(1 for r in ratios if r > 1),
                "log_problems": problems(lbs)[:10],
            }
            log(f"control {key}: paired ratio {out[key]['ratio']['median']:.3f}")
        finally:
            stop(cluster, *lbs, mock)
    return out


def main_thread_cpu(pid: int) -> float:
    """utime + stime of the process's main thread (the trio loop), in seconds; the rest of
    the process's CPU is its worker threads (lb's Redis calls go through trio.to_thread)."""
    return cpu_seconds_of(f"/proc/{pid}/task/{pid}/stat")


def cpu_seconds_of(path: str) -> float:
    with open(path) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _cmdline(proc: Proc) -> str:
    """The command line, with the lb script shortened to `lb`."""
    argv = list(proc.argv)
    script = lb_command()
    for i in range(len(argv) - len(script) + 1):
        if argv[i : i + len(script)] == script:
            argv[i : i + len(script)] = ["lb"]
            break
    return shlex.join(argv)


def summarise_cpu(cpu: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for mode in MODES:
        runs = [r for r in cpu["runs"] if r["mode"] == mode]
        by = {name: [r for r in runs if r["config"] == name] for name in ("none", "redis")}
        none = [r["cpu_ms_per_request"] for r in by["none"]]
        red = [r["cpu_ms_per_request"] for r in by["redis"]]
        paired = [
            b["cpu_ms_per_request"] / a["cpu_ms_per_request"]
            for a, b in zip(by["none"], by["redis"], strict=False)
            if a["cpu_ms_per_request"] > 0
        ]
        rows.append({
            "mode": mode,
            "runs": len(paired),
            "none_cpu_ms": spread(none),
            "redis_cpu_ms": spread(red),
            "ratio_of_medians": statistics.median(red) / statistics.median(none)
            if none and red else math.nan,
            "paired_ratio": spread(paired),
            "none_threads_ms": spread([r["threads_cpu_ms_per_request"] for r in by["none"]]),
            "redis_threads_ms": spread([r["threads_cpu_ms_per_request"] for r in by["redis"]]),
            "threads_share_redis": sum(r["threads_cpu_s"] for r in by["redis"])
            / max(1e-9, sum(r["cpu_s"] for r in by["redis"])),
            "pooled_ratio": (sum(r["cpu_s"] for r in by["redis"]) / max(1, sum(r["ok"] for r in
                             by["redis"]))) / max(1e-12, sum(r["cpu_s"] for r in by["none"])
                             / max(1, sum(r["ok"] for r in by["none"]))),
            "none_rps": spread([r["rps"] for r in by["none"]]),
            "redis_rps": spread([r["rps"] for r in by["redis"]]),
            "errors": sum(r["errors"] for r in runs),
        })
    return rows


def proxy_reference(results_dir: Path) -> dict[str, Any] | None:
    """The c=16 CPU-per-request figures of the newest full proxy_bench run, for reference."""
    files = sorted(p for p in results_dir.glob("proxy-*.json") if "quick" not in p.name)
    if not files:
        return None
    try:
        data = json.loads(files[-1].read_text())
        cpu = {
            c["mode"]: c["cpu_ms_per_request"]["median"]
            for c in data["summary"]["cpu"] if c["concurrency"] == 16
        }
        return {"file": files[-1].name, "git": data["meta"].get("git"), "cpu_ms": cpu}
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- 2. node death -> gone from every instance ---------------------------------------------


def run_death(
    plan: Plan, cluster: Cluster, redis: Proc, scan_interval: float, reps: int
) -> dict[str, Any]:
    """A fleet of FLEET_SIZE lbs sharing Redis and one lb without Redis, all watching a victim
    and a survivor node. Each repetition SIGKILLs the victim at a random phase of the scan,
    polls every instance until it shows the victim down, then starts the victim again (same
    port) and waits until every instance shows it up."""
    victim_port = free_port()
    victim = start_mock(cluster, "victim", victim_port)
    survivor = start_mock(cluster, "survivor")
    victim_key = f"{HOST}:{victim_port}"
    nodes = f"{HOST}:{victim_port},{HOST}:{survivor.port}"
    common = {
        "LB_NODES": nodes, "SCAN_INTERVAL": f"{scan_interval:g}",
        "HEALTH_FAIL_THRESHOLD": str(FAIL_THRESHOLD),
    }
    prefix = new_prefix()
    fleet = [
        start_lb(cluster, f"fleet{i}", {**redis_env(redis, prefix), **common})
        for i in range(FLEET_SIZE)
    ]
    solo = start_lb(cluster, "solo", common)
    watchers = {**{p.name: p for p in fleet}, "solo": solo}
    out: dict[str, Any] = {
        "scan_interval": scan_interval,
        "fail_threshold": FAIL_THRESHOLD,
        "sync_secs": DEFAULT_SYNC_SECS,
        "commands": {name: _cmdline(p) for name, p in watchers.items()},
        "reps": [],
    }
    try:
        wait_fleet(fleet)
        for rep in range(reps):
            if victim.popen is None or victim.popen.poll() is not None:
                cluster.stop(victim)
                victim = start_mock(cluster, "victim", victim_port)
            up_after = wait_until(
                "every instance to see the victim up",
                lambda: all(node_health(p.port, victim_key) for p in watchers.values()),
                timeout=3 * scan_interval + BOUNDED_WAIT,
            )
            leaders = [p.name for p in fleet if fleet_status(p.port).get("leader")]
            time.sleep(random.uniform(0, scan_interval))  # a random phase of the scan
            assert victim.popen is not None
            note_foreign("2. node death")
            os.kill(victim.pid, signal.SIGKILL)
            t0 = time.monotonic()
            victim.popen.wait(10)
            seen = poll_down(watchers, victim_key, t0, FAIL_THRESHOLD * scan_interval + 30)
            health = {name: get(p.port, "/health")[0] for name, p in watchers.items()}
            fleet_times = [seen[p.name] for p in fleet]
            leader_times = [seen[name] for name in leaders]
            record = {
                "rep": rep,
                "seen_down_s": seen,
                "leader": leaders,
                "leader_s": min(leader_times) if leader_times else math.nan,
                "followers_max_s": max(
                    (seen[p.name] for p in fleet if p.name not in leaders), default=math.nan
                ),
                "all_fleet_s": max(fleet_times),
                "first_fleet_s": min(fleet_times),
                "solo_s": seen["solo"],
                "health_status_after": health,
                "victim_back_up_s": up_after if rep else None,
            }
            out["reps"].append(record)
            log(
                f"death (SCAN_INTERVAL={scan_interval:g}) rep {rep}: "
                f"leader {record['leader_s']:.2f}s, all {FLEET_SIZE} "
                f"{record['all_fleet_s']:.2f}s, solo {record['solo_s']:.2f}s"
            )
        out["log_problems"] = problems(
            list(watchers.values()), expected=("is down after",)
        )[:20]
    finally:
        stop(cluster, solo, *fleet, victim, survivor)
    return out


def poll_down(
    watchers: dict[str, Proc], key: str, t0: float, time_limit: float
) -> dict[str, float]:
    """Poll every watcher's /v1/nodes every POLL_SECS until each shows `key` unhealthy; for
    each, the seconds from t0 to the first poll that saw it (NaN if never, within the limit)."""
    seen: dict[str, float] = {}
    tick = 0
    while len(seen) < len(watchers):
        now = time.monotonic()
        if now - t0 > time_limit:
            break
        for name, proc in watchers.items():
            if name in seen:
                continue
            try:
                healthy = node_health(proc.port, key)
            except (OSError, ValueError):
                continue
            if healthy is False:
                seen[name] = time.monotonic() - t0
        tick += 1
        next_at = t0 + tick * POLL_SECS
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:  # behind: skip the missed ticks
            tick = math.ceil((time.monotonic() - t0) / POLL_SECS)
    return {name: seen.get(name, math.nan) for name in watchers}


def summarise_death(death: dict[str, Any]) -> dict[str, Any]:
    reps = death["reps"]
    s, t, sync = death["scan_interval"], death["fail_threshold"], death["sync_secs"]
    return {
        "scan_interval": s,
        "reps": len(reps),
        **{key: spread([r[key] for r in reps]) for key in (
            "leader_s", "followers_max_s", "all_fleet_s", "first_fleet_s", "solo_s",
        )},
        "missed": sum(
            1 for r in reps for v in r["seen_down_s"].values() if math.isnan(v)
        ),
        "health_not_200": sum(
            1 for r in reps for v in r["health_status_after"].values() if v != 200
        ),
        "expected_leader_s": [(t - 1) * s, t * s],
        "expected_all_s": [(t - 1) * s, t * s + sync],
    }


# --- 3. idle CPU with 100 registered nodes -------------------------------------------------


def start_many_mocks(cluster: Cluster, count: int) -> tuple[Proc, list[int]]:
    ports_file = cluster.logdir / f"mock-ports-{count}.json"
    ports_file.unlink(missing_ok=True)
    control = free_port()  # many_mocks listens on free ports of its own; this is never used
    argv = [sys.executable, str(BENCH_DIR / "many_mocks.py"), "--count", str(count),
            "--ports-file", str(ports_file)]
    proc = Proc("many-mocks", argv, control, cluster.logdir)
    with open(proc.log_path, "wb") as out:
        proc.popen = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    cluster.procs.append(proc)

    def ready() -> bool:
        if proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"many_mocks.py exited at start:\n{proc.log_tail()}")
        return ports_file.exists()

    wait_until(f"{count} mock nodes", ready)
    ports = json.loads(ports_file.read_text())
    return proc, ports


def idle_window(procs: dict[str, Proc], secs: float) -> dict[str, dict[str, Any]]:
    """CPU of each process over `secs` of no traffic, sampled every second; RSS at the end."""
    note_foreign("3. idle CPU")
    samples = {name: [cpu_seconds(p.pid)] for name, p in procs.items()}
    t0 = time.monotonic()
    for i in range(1, math.ceil(secs) + 1):
        delay = t0 + i - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for name, p in procs.items():
            samples[name].append(cpu_seconds(p.pid))
    elapsed = time.monotonic() - t0
    note_foreign("3. idle CPU")
    out = {}
    for name, p in procs.items():
        s = samples[name]
        per_second = [(b - a) * 1000 for a, b in itertools.pairwise(s)]
        total_ms = (s[-1] - s[0]) * 1000
        mem = memory_kb(p.pid)
        out[name] = {
            "secs": elapsed,
            "cpu_ms": total_ms,
            "cpu_ms_per_s": total_ms / elapsed,
            "core_percent": total_ms / elapsed / 10,
            "peak_1s_ms": max(per_second, default=math.nan),
            "busy_seconds": sum(1 for v in per_second if v > 0),
            "per_second_ms": per_second,
            "rss_mb": mem.get("VmRSS", 0) / 1024,
            "hwm_mb": mem.get("VmHWM", 0) / 1024,
        }
    return out


def run_idle(plan: Plan, cluster: Cluster, redis: Proc) -> dict[str, Any]:
    mocks, ports = start_many_mocks(cluster, plan.idle_nodes)
    nodes = ",".join(f"{HOST}:{p}" for p in ports)
    out: dict[str, Any] = {"nodes": len(ports), "windows": [], "commands": {}}
    try:
        for rep in range(plan.idle_reps):
            solo = start_lb(cluster, "idle-none", {"LB_NODES": nodes})
            try:
                wait_all_healthy([solo], len(ports))
                time.sleep(plan.idle_settle_secs)
                window = idle_window({"none": solo, "mocks": mocks}, plan.idle_secs)
                out["windows"].append({"rep": rep, "config": "none", **window})
                out["commands"]["none"] = _cmdline(solo).replace(nodes, "<100 nodes>")
                out.setdefault("log_problems", []).extend(problems([solo]))
            finally:
                stop(cluster, solo)
            log(f"idle rep {rep} none: {window['none']['cpu_ms_per_s']:.2f} CPU-ms/s, "
                f"RSS {window['none']['rss_mb']:.1f} MB")
            env = {**redis_env(redis, new_prefix()), "LB_NODES": nodes}
            leader = start_lb(cluster, "idle-leader", env)
            follower = start_lb(cluster, "idle-follower", env)
            try:
                wait_all_healthy([leader, follower], len(ports))
                wait_fleet([leader, follower])
                if not fleet_status(leader.port).get("leader"):
                    leader, follower = follower, leader  # the one started second took the lease
                time.sleep(plan.idle_settle_secs)
                window = idle_window(
                    {"redis leader": leader, "redis follower": follower, "mocks": mocks},
                    plan.idle_secs,
                )
                out["windows"].append({"rep": rep, "config": "redis", **window})
                out["commands"]["redis"] = _cmdline(leader).replace(nodes, "<100 nodes>")
                out.setdefault("log_problems", []).extend(problems([leader, follower]))
                out.setdefault("leader_check", []).append(
                    [fleet_status(p.port).get("leader") for p in (leader, follower)]
                )
            finally:
                stop(cluster, leader, follower)
            log(f"idle rep {rep} redis: leader {window['redis leader']['cpu_ms_per_s']:.2f}, "
                f"follower {window['redis follower']['cpu_ms_per_s']:.2f} CPU-ms/s")
    finally:
        stop(cluster, mocks)
    return out


def summarise_idle(idle: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for who in ("none", "redis leader", "redis follower"):
        windows = [w[who] for w in idle["windows"] if who in w]
        mocks = [w["mocks"] for w in idle["windows"] if who in w]
        if not windows:
            continue
        rows.append({
            "instance": who,
            "windows": len(windows),
            "secs": windows[0]["secs"],
            **{key: spread([w[key] for w in windows]) for key in (
                "cpu_ms_per_s", "core_percent", "peak_1s_ms", "rss_mb",
            )},
            "mocks_cpu_ms_per_s": spread([m["cpu_ms_per_s"] for m in mocks]),
        })
    return rows


# --- the run -------------------------------------------------------------------------------


def measure(plan: Plan, logdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    cluster = Cluster(logdir)
    try:
        redis = start_redis(cluster)
        results["redis_command"] = shlex.join(redis.argv)
        log(f"redis-server on :{redis.port}; logs in {logdir}")
        log("1. CPU per request, with and without Redis")
        results["cpu"] = run_cpu(plan, cluster, redis)
        if plan.control_reps:
            log("1b. controls of the CPU comparison")
            results["controls"] = run_controls(plan, cluster, redis)
        log("2. node death, SCAN_INTERVAL=1")
        results["death"] = [run_death(plan, cluster, redis, 1.0, plan.death_reps)]
        if plan.death_default_reps:
            log(f"2. node death, SCAN_INTERVAL={DEFAULT_SCAN_INTERVAL:g} (default)")
            results["death"].append(
                run_death(plan, cluster, redis, DEFAULT_SCAN_INTERVAL, plan.death_default_reps)
            )
        log(f"3. idle CPU with {plan.idle_nodes} nodes")
        results["idle"] = run_idle(plan, cluster, redis)
    finally:
        cluster.close()
        results["foreign_benchmarks"] = list(_foreign_seen.values())
    return results


def summarise(results: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    cpu = summarise_cpu(results["cpu"])
    targets = [
        {
            "figure": f"lb CPU per {row['mode']} request with Redis / without (c=16)",
            "value": row["paired_ratio"]["median"],
            "target": CPU_RATIO_TARGET,
            "met": bool(row["paired_ratio"]["median"] <= CPU_RATIO_TARGET),
        }
        for row in cpu
    ]
    return {
        "cpu": cpu,
        "death": [summarise_death(d) for d in results["death"]],
        "idle": summarise_idle(results["idle"]),
        "targets": targets,
        "proxy_reference": reference,
    }


def report(meta: dict[str, Any], plan: Plan, results: dict[str, Any],
           summary: dict[str, Any]) -> str:
    m = meta["machine"]
    cpu_rows = {row["mode"]: row for row in summary["cpu"]}
    death = summary["death"]
    idle = {row["instance"]: row for row in summary["idle"]}
    ref = summary["proxy_reference"]
    lines = [
        f"# lb fleet (Redis) benchmark — {meta['date']}",
        "",
        f"Command: `{meta['command']}` (git {meta['git']}, {meta['elapsed_min']:.1f} min)",
        "",
        f"lb imported from `{meta['lb_path']}`"
        + (" (not in a git work tree)" if meta["lb_changes"] is None
           else f"; uncommitted changes there: `{meta['lb_changes']}`" if meta["lb_changes"]
           else ", no uncommitted changes in its lb/") + ".",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']} "
        f"({m['implementation']}), Linux {m['kernel']}; load average {meta['load_before']} "
        f"before, {meta['load_after']} after. {meta.get('waited', '')}",
        "",
        f"Redis: a private `{results['redis_command']}` (started and stopped by the run). Every "
        "figure is the median over the repetitions, with [min, max] across them.",
        "",
        "## Summary",
        "",
        "| figure | median [min, max] | target / expected |",
        "| --- | --- | --- |",
    ]
    for mode in MODES:
        row = cpu_rows[mode]
        lines.append(
            f"| lb CPU ms per {mode} request (c=16), no Redis → Redis | "
            f"{_f(row['none_cpu_ms'], 3)} → {_f(row['redis_cpu_ms'], 3)} | |"
        )
        lines.append(
            f"| **ratio Redis / none, {mode}** (paired per repetition) | "
            f"{_f(row['paired_ratio'], 3)} | ≤ {CPU_RATIO_TARGET} "
            f"{'(met)' if row['paired_ratio']['median'] <= CPU_RATIO_TARGET else '(**not met**)'} |"
        )
    for d in death:
        s = d["scan_interval"]
        lines.append(
            f"| node death → down on all {FLEET_SIZE} fleet instances, SCAN_INTERVAL={s:g} s, s |"
            f" {_f(d['all_fleet_s'])} | {d['expected_all_s'][0]:g} to {d['expected_all_s'][1]:g} |"
        )
        lines.append(
            f"| node death → down on one lb without Redis, SCAN_INTERVAL={s:g} s, s | "
            f"{_f(d['solo_s'])} | {d['expected_leader_s'][0]:g} to {d['expected_leader_s'][1]:g} |"
        )
    for who in ("none", "redis leader", "redis follower"):
        if who in idle:
            row = idle[who]
            lines.append(
                f"| idle lb with {results['idle']['nodes']} nodes ({who}): CPU-ms/s, % of a core,"
                f" RSS MB | {_f(row['cpu_ms_per_s'])} ms/s, {_f(row['core_percent'], 3)} %, "
                f"{_f(row['rss_mb'], 1)} MB | |"
            )
    lines += [
        "",
        f"## 1. CPU per request, with and without Redis ({plan.requests:,} requests per run, "
        f"lb bench -c 16, {plan.cpu_reps} repetitions)",
        "",
        "Two lbs in front of the same `lb mock --tokens 8` (9-event streams): without Redis, and "
        "with `REDIS_URL` (one instance: it holds the scanner lease and syncs every 0.5 s). "
        "Within each repetition and mode they run one after the other, no Redis first. CPU is "
        "utime+stime of the lb process over the run divided by the requests served, as in "
        "proxy_bench.py. The paired ratio is taken per repetition (the two adjacent runs), "
        "then its median.",
        "",
        f"- without Redis: `{results['cpu']['commands']['none']}`",
        f"- with Redis: `{results['cpu']['commands']['redis']}`",
        "",
        "| request | no Redis CPU ms/req | Redis CPU ms/req | ratio of medians | paired ratio "
        "| no Redis req/s | Redis req/s | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary["cpu"]:
        lines.append(
            f"| {row['mode']} | {_f(row['none_cpu_ms'], 3)} | {_f(row['redis_cpu_ms'], 3)} | "
            f"{row['ratio_of_medians']:.3f} | {_f(row['paired_ratio'], 3)} | "
            f"{_f(row['none_rps'], 0)} | {_f(row['redis_rps'], 0)} | {row['errors']} |"
        )
    lines += [
        "",
        "The pooled ratio is (all CPU / all requests) with Redis over the same without. The "
        "direct measure of what Redis adds: lb's Redis calls run in worker threads "
        "(`trio.to_thread`), so the process's CPU minus its main thread's (from "
        "/proc/PID/task/PID/stat) is the Redis I/O; the main thread's share of a sync (one "
        "`orjson.dumps`, applying the result) is in the follower's idle figure of section 3.",
        "",
        "| request | pooled ratio | worker-thread CPU ms/req, no Redis | worker-thread CPU "
        "ms/req, Redis | worker threads' share of the Redis lb's CPU |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in summary["cpu"]:
        lines.append(
            f"| {row['mode']} | {row['pooled_ratio']:.3f} | {_f(row['none_threads_ms'], 4)} | "
            f"{_f(row['redis_threads_ms'], 4)} | {100 * row['threads_share_redis']:.2f} % |"
        )
    lines += ["", "Each run, in order:", "",
              "| rep | request | config | CPU ms/req | worker threads ms/req | req/s |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in results["cpu"]["runs"]:
        lines.append(f"| {r['rep']} | {r['mode']} | {r['config']} | "
                     f"{r['cpu_ms_per_request']:.3f} | {r['threads_cpu_ms_per_request']:.4f} | "
                     f"{r['rps']:.0f} |")
    if ref:
        lines += [
            "",
            f"For reference, the in-process figures of the proxy-core benchmark ({ref['file']}, "
            f"git {ref['git']}, c=16): "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in ref["cpu_ms"].items())
            + ". That was another run at another time; the ratio above compares runs of the same "
            "minute and is the figure to judge by.",
        ]
    controls = results.get("controls") or {}
    if controls:
        lines += [
            "",
            f"### 1b. Controls ({plan.control_reps} A B pairs of {plan.requests:,}-request "
            "stream runs each, fresh lbs)",
            "",
            "What the same A B method gives when nothing differs, with the order reversed, and "
            "with ten times the Redis syncs; the spread here is the resolution of the ratio "
            "above.",
            "",
            "| control | paired ratio | pairs above 1 |",
            "| --- | --- | --- |",
        ]
        for c in controls.values():
            lines.append(f"| {c['what']} | {_f(c['ratio'], 3)} | {c['above_1']} of "
                         f"{len(c['pairs_cpu_ms'])} |")
    lines += [
        "",
        f"## 2. Node death → gone from every instance ({FLEET_SIZE} lbs on Redis + 1 without)",
        "",
        f"Two `lb mock` nodes, a victim and a survivor (so `/health` stays 200). {FLEET_SIZE} "
        f"lbs share Redis (`REDIS_SYNC_SECS` 0.5, `HEALTH_FAIL_THRESHOLD={FAIL_THRESHOLD}`), and "
        "one lb without Redis watches the same two nodes. Each repetition waits until every "
        "instance shows the victim up, sleeps a random fraction of SCAN_INTERVAL (a random "
        "phase of the scan), SIGKILLs the victim, and polls every instance's `GET /v1/nodes` "
        f"every {POLL_SECS * 1000:.0f} ms until it shows the victim `healthy: false`; the times "
        f"are from the kill to that poll (so up to {POLL_SECS * 1000:.0f} ms late plus a poll's "
        "round trip). The victim is then started again on the same port.",
        "",
        "| SCAN_INTERVAL | reps | leader (scans) s | slowest follower s | all "
        f"{FLEET_SIZE} s | first s | lb without Redis s | missed | /health not 200 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in death:
        lines.append(
            f"| {d['scan_interval']:g} s | {d['reps']} | {_f(d['leader_s'])} | "
            f"{_f(d['followers_max_s'])} | **{_f(d['all_fleet_s'])}** | {_f(d['first_fleet_s'])}"
            f" | {_f(d['solo_s'])} | {d['missed']} | {d['health_not_200']} |"
        )
    lines += [
        "",
        "Expected: a killed node refuses connections at once, so each probe fails at once. The "
        "first failing probe comes within one SCAN_INTERVAL S of the death, the "
        f"HEALTH_FAIL_THRESHOLD-th (T={FAIL_THRESHOLD}) T-1 intervals later, so the scanning "
        "instance (the leader, or an lb without Redis) marks it down (T-1)·S to T·S after the "
        "death; it publishes its table at once and every other instance reads it at its next "
        "sync, within REDIS_SYNC_SECS (0.5 s). Bound for all instances: T·S + REDIS_SYNC_SECS "
        "(+ a round trip), i.e. "
        + ", ".join(f"{d['expected_all_s'][1]:g} s for S={d['scan_interval']:g}" for d in death)
        + ("" if any(d["scan_interval"] == DEFAULT_SCAN_INTERVAL for d in death) else
           f", and {FAIL_THRESHOLD * DEFAULT_SCAN_INTERVAL + DEFAULT_SYNC_SECS:g} s with the "
           f"default S={DEFAULT_SCAN_INTERVAL:g} (not measured in this run)")
        + ". A node whose machine vanishes (no RST) fails each probe only after "
        "HEALTH_CHECK_TIMEOUT_SECONDS instead, which this benchmark does not measure.",
        "",
        "Per repetition (seconds from the kill; `*` marks the leader):",
        "",
    ]
    for d_raw in results["death"]:
        names = list(d_raw["reps"][0]["seen_down_s"]) if d_raw["reps"] else []
        lines += [
            f"SCAN_INTERVAL={d_raw['scan_interval']:g}:",
            "",
            "| rep | " + " | ".join(names) + " |",
            "| --- |" + " --- |" * len(names),
        ]
        for r in d_raw["reps"]:
            cells = [f"{r['seen_down_s'][n]:.2f}" + ("*" if n in r["leader"] else "")
                     for n in names]
            lines.append(f"| {r['rep']} | " + " | ".join(cells) + " |")
        lines.append("")
    idle_raw = results["idle"]
    lines += [
        f"## 3. Idle CPU of an instance with {idle_raw['nodes']} registered nodes",
        "",
        f"{idle_raw['nodes']} `MockNode`s in one process (`python bench/many_mocks.py --count "
        f"{idle_raw['nodes']}`), and lb with all of them in `LB_NODES`, default settings "
        f"(SCAN_INTERVAL 10 s, REDIS_SYNC_SECS 0.5). Once every node shows healthy and "
        f"{plan.idle_settle_secs:g} s have passed, lb's CPU is read every second for "
        f"{plan.idle_secs:g} s of no traffic; RSS at the end. Without Redis one lb runs alone; "
        "with Redis two instances share it, the leader (probes the 100 nodes, publishes the "
        "table) and a follower (syncs, imports the table when it changes), measured in the same "
        "window.",
        "",
        f"- without Redis: `{idle_raw['commands'].get('none', '?')}`",
        f"- with Redis: `{idle_raw['commands'].get('redis', '?')}` (twice)",
        "",
        "| instance | windows | CPU-ms per s | % of one core | busiest second, CPU-ms | RSS MB "
        "| the 100 mocks' CPU-ms per s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary["idle"]:
        lines.append(
            f"| {row['instance']} | {row['windows']} x {row['secs']:.0f} s | "
            f"{_f(row['cpu_ms_per_s'])} | {_f(row['core_percent'], 3)} | {_f(row['peak_1s_ms'], 0)}"
            f" | {_f(row['rss_mb'], 1)} | {_f(row['mocks_cpu_ms_per_s'])} |"
        )
    all_problems = (
        results["cpu"].get("log_problems", [])
        + [p for c in (results.get("controls") or {}).values() for p in c["log_problems"]]
        + [p for d in results["death"] for p in d.get("log_problems", [])]
        + results["idle"].get("log_problems", [])
    )
    lines += [
        "",
        "## lb logs",
        "",
        f"{len(all_problems)} unexpected warning/error lines (the scanner's `node ... is down` "
        "warnings of section 2 left out)" + (":" if all_problems else "."),
    ]
    lines += [f"    {p}" for p in all_problems[:20]]
    foreign = results.get("foreign_benchmarks", [])
    lines += [
        "",
        "## Other benchmarks on the machine during the run",
        "",
        "Checked before every measurement (processes running `hey` or `lb bench`, "
        "proxy_bench.py, ab_cpu.py or upstream_client_cpu.py that this run did not start): "
        + (f"{len(foreign)} seen:" if foreign else "none seen."),
    ]
    lines += [f"- during {', '.join(f['sections'])}: `{f['cmd']}`" for f in foreign[:20]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--note", default="", help="a line for the report (e.g. about the load)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if shutil.which("redis-server") is None:
        print("fleet_bench: needs `redis-server` on PATH (apt-get install redis-server)",
              file=sys.stderr)
        return 2
    for name in lb_setting_names():  # the lbs get only the settings given here
        os.environ.pop(name, None)
    raise_fd_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    meta: dict[str, Any] = {
        "date": date,
        "command": shlex.join(["python", "bench/fleet_bench.py", *sys.argv[1:]]),
        "git": git_rev(),
        "machine": machine(),
        "load_before": loadavg(),
        "plan": asdict(plan),
        "waited": args.note,
        **lb_source(),
    }
    logdir = Path(tempfile.mkdtemp(prefix="lb-fleet-bench-"))
    started = time.monotonic()
    with terminate_on_sigterm():
        results = measure(plan, logdir)
    meta["elapsed_min"] = (time.monotonic() - started) / 60
    meta["load_after"] = loadavg()
    summary = summarise(results, proxy_reference(RESULTS_DIR))
    stem = f"fleet-{date}" + ("-quick" if args.quick else "")
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
