"""STREAM_RESUME under load: a node killed mid-stream, and how many streams the clients got whole.

Each run starts `--nodes` mock nodes (`lb mock`, each its own process, `--tokens` words at one
per `--itl-ms`) and one `lb serve` in front of them (default strategy, LB_LOG_LEVEL=info for
the access lines), then opens `--streams` chat streams (one every `--ramp-ms`) with the
official `openai` SDK (AsyncOpenAI under trio, its retries off) and SIGKILLs the first node
`--kill-after` seconds after a fraction `--kill-at-heads` of the streams got their response
head, in the middle of its streams. A stream counts as *whole* when the SDK read it to the end
without an exception, every chunk has the same id, one chunk carries the role, one the finish
reason, and the text is exactly the mock's whole answer (the mock's tokens are deterministic
and it honours `continue_final_message`, so a resumed answer must equal an uninterrupted one).
A stream that the SDK finished but whose text differs is *incoherent*; one it raised on is
*broken*. Streams are attributed to a node by `x-routed-node` (the node of the first attempt);
the streams the kill cut are the ones lb's access log shows resumed (on) or the broken ones
(off).

The same load runs with STREAM_RESUME off and on, alternately (`--reps` times each); lb's
access log gives the number of resumed streams (`resumed=1`).

    python bench/resume_bench.py                 # 3 reps x (off, on), 200 streams over 4 nodes
    python bench/resume_bench.py --quick         # 1 rep, 40 streams

Results go to bench/results/stream-resume-YYYY-MM-DD.{md,json} (--out DIR to change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import trio
from proxy_bench import HOST, RESULTS_DIR, Proc, free_port, git_rev, lb_command, log, machine

# The lb of this checkout, here and in the subprocesses (the venv's may be another one).
REPO = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
from lb.testing.mock import _answer_text  # noqa: E402

MODEL = "bench-model"
MESSAGES = [{"role": "user", "content": "Tell the benchmark a long story"}]


def start_mock(logdir: Path, tokens: int, itl_ms: float, name: str) -> Proc:
    port = free_port()
    argv = [
        *lb_command(), "mock", "--host", HOST, "--port", str(port), "--model", MODEL,
        "--tokens", str(tokens), "--itl-ms", f"{itl_ms:g}", "--name", name,
    ]
    return Proc(f"mock-{name}", argv, port, logdir).start()


def start_lb(logdir: Path, nodes: list[Proc], resume: bool, resume_max: int) -> Proc:
    port = free_port()
    env = [f"STREAM_RESUME={'true' if resume else 'false'}", f"STREAM_RESUME_MAX={resume_max}"]
    argv = [
        "env", *env, *lb_command(), "serve", "--host", HOST, "--port", str(port),
        "--log-level", "info",
        *[arg for node in nodes for arg in ("--node", f"{HOST}:{node.port}")],
    ]
    return Proc(f"lb-{'on' if resume else 'off'}", argv, port, logdir).start()


async def wait_for_nodes(lb: Proc, count: int) -> None:
    async with httpx.AsyncClient() as client:
        with trio.fail_after(30):
            while True:
                nodes = (await client.get(f"http://{HOST}:{lb.port}/v1/nodes")).json()
                listed = nodes.get("nodes", nodes) if isinstance(nodes, dict) else nodes
                healthy = [n for n in listed if isinstance(n, dict) and n.get("healthy")]
                if len(healthy) >= count:
                    return
                await trio.sleep(0.1)


class Heads:
    """How many streams have their response head (the killer waits for all of them)."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = trio.Event()

    def one_more(self) -> None:
        self.count += 1
        self.changed.set()
        self.changed = trio.Event()


async def one_stream(
    client: openai.AsyncOpenAI, expected: str, out: list[dict[str, Any]], heads: Heads
) -> None:
    result: dict[str, Any] = {"node": None, "outcome": "broken", "error": None}
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, stream=True,  # type: ignore[arg-type]
        )
        result["node"] = raw.headers.get("x-routed-node")
        heads.one_more()
        stream = raw.parse()
        ids, roles, finishes, parts = set(), 0, 0, []
        async for chunk in stream:
            ids.add(chunk.id)
            for choice in chunk.choices:
                roles += choice.delta.role is not None
                finishes += choice.finish_reason is not None
                parts.append(choice.delta.content or "")
        whole = len(ids) == 1 and roles == 1 and finishes == 1 and "".join(parts) == expected
        result["outcome"] = "whole" if whole else "incoherent"
    except Exception as exc:  # what the client saw: counted, never hidden
        result["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    result["ended"] = time.monotonic()
    out.append(result)


async def one_run(args: argparse.Namespace, resume: bool, logdir: Path) -> dict[str, Any]:
    mocks = [start_mock(logdir, args.tokens, args.itl_ms, f"n{i}") for i in range(args.nodes)]
    lb = start_lb(logdir, mocks, resume, args.resume_max)
    victim = mocks[0]
    results: list[dict[str, Any]] = []
    expected = _answer_text(args.tokens)
    try:
        await wait_for_nodes(lb, args.nodes)
        client = openai.AsyncOpenAI(
            base_url=f"http://{HOST}:{lb.port}/v1", api_key="bench", max_retries=0,
            timeout=120, http_client=None,
        )
        started = time.monotonic()
        heads = Heads()
        async with trio.open_nursery() as nursery:
            for _ in range(args.streams):
                nursery.start_soon(one_stream, client, expected, results, heads)
                # A ramp: one client process opening them all at once starves itself (lb's
                # header timeout then answers 408 to requests it never finished sending).
                await trio.sleep(args.ramp_ms / 1000)
            # Enough streams under way (on a loaded machine the last heads come long after
            # the first streams ended), then the kill, mid-answer.
            with trio.move_on_after(120):
                while heads.count + len(results) < args.streams * args.kill_at_heads:
                    await heads.changed.wait()
            await trio.sleep(args.kill_after)
            os.kill(victim.pid, signal.SIGKILL)
            killed = time.monotonic()
            killed_at = killed - started
        elapsed = time.monotonic() - started
        await client.close()
    finally:
        lb.stop()  # flushes its access log
        for mock in mocks:
            mock.stop()
    text = lb.log_path.read_text(errors="replace")
    victim_key = f"{HOST}:{victim.port}"
    on_victim = [r for r in results if r["node"] == victim_key]
    count = {k: sum(r["outcome"] == k for r in results) for k in ("whole", "incoherent", "broken")}
    # Broken by the kill (the error event of a stream cut mid-answer), or by anything else (a
    # loaded client too slow to send its request in time gets lb's 408).
    count["broken_mid_stream"] = sum("mid-stream" in (r["error"] or "") for r in results)
    return {
        "resume": resume,
        "streams": len(results),
        **count,
        "on_killed_node": len(on_victim),
        "on_killed_node_whole": sum(r["outcome"] == "whole" for r in on_victim),
        "ended_after_the_kill": sum(r["ended"] > killed for r in results),
        "resumed_in_access_log": text.count(" resumed=1"),
        "killed_at_s": round(killed_at, 3),
        "seconds": round(elapsed, 2),
        "errors_seen": sorted({r["error"] for r in results if r["error"]})[:5],
    }


def report(args: argparse.Namespace, runs: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"# STREAM_RESUME: a node killed mid-stream ({datetime.date.today()})",
        "",
        f"Command: `{command}` (commit {git_rev()}).",
        "",
        f"{args.streams} chat streams ({args.ramp_ms:g} ms apart) through one lb over "
        f"{args.nodes} mock nodes "
        f"(`lb mock --tokens {args.tokens} --itl-ms {args.itl_ms:g}`, so a stream lasts about "
        f"{args.tokens * args.itl_ms / 1000:.1f} s unloaded); the first node is SIGKILLed "
        f"{args.kill_after:g} s after {args.kill_at_heads:.0%} of the streams got their head. "
        "Clients: the official "
        "`openai` SDK. "
        "Whole = read to the end without an exception, one id, one role chunk, one finish "
        "reason, and exactly the text of one uninterrupted answer. STREAM_RESUME_MAX="
        f"{args.resume_max}.",
        "",
        "| STREAM_RESUME | rep | streams | whole | incoherent | broken mid-stream | broken "
        "otherwise | on the killed node | of those whole | resumed (access log) | "
        "streams open at the kill | kill at s | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    reps: dict[bool, int] = {False: 0, True: 0}
    for run in runs:
        reps[run["resume"]] += 1
        lines.append(
            f"| {'on' if run['resume'] else 'off'} | {reps[run['resume']]} | {run['streams']} | "
            f"{run['whole']} | {run['incoherent']} | {run['broken_mid_stream']} | "
            f"{run['broken'] - run['broken_mid_stream']} | {run['on_killed_node']} | "
            f"{run['on_killed_node_whole']} | {run['resumed_in_access_log']} | "
            f"{run['ended_after_the_kill']} | {run['killed_at_s']} | {run['seconds']} |"
        )
    lines.append("")
    for resume in (False, True):
        mine = [r for r in runs if r["resume"] is resume]
        if not mine:
            continue
        whole = [r["whole"] / r["streams"] for r in mine]
        victim = [r["on_killed_node_whole"] / max(1, r["on_killed_node"]) for r in mine]
        lines.append(
            f"- STREAM_RESUME {'on' if resume else 'off'}: median {statistics.median(whole):.1%} "
            f"of all streams whole; of the streams on the killed node, median "
            f"{statistics.median(victim):.1%} whole."
        )
        errors = sorted({e for r in mine for e in r["errors_seen"]})
        if errors:
            lines.append(f"  What the SDK raised: {'; '.join(errors[:3])}")
    lines += ["", f"Machine: {json.dumps(machine())}", ""]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="resume-bench-") as tmp:
        for rep in range(args.reps):
            for resume in (False, True):
                log(f"rep {rep + 1}/{args.reps}, STREAM_RESUME={'on' if resume else 'off'}")
                run = await one_run(args, resume, Path(tmp))
                log(f"  {run}")
                runs.append(run)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--itl-ms", type=float, default=100.0)
    parser.add_argument("--kill-after", type=float, default=1.0)
    parser.add_argument("--kill-at-heads", type=float, default=0.5,
                        help="the fraction of streams with their head before the kill")
    parser.add_argument("--ramp-ms", type=float, default=10.0, help="between two stream starts")
    parser.add_argument("--resume-max", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 rep, 40 streams")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    if args.quick:
        args.reps, args.streams = 1, 40
    command = "python bench/resume_bench.py " + shlex.join(sys.argv[1:])
    runs = trio.run(main_async, args)
    stem = f"stream-resume-{datetime.date.today()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"command": command, "settings": {k: str(v) for k, v in vars(args).items()},
         "machine": machine(), "commit": git_rev(), "runs": runs}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(report(args, runs, command.strip()))
    log(f"wrote {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
