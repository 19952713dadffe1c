"""The cost of the Anthropic edge (`POST /v1/messages`), two ways:

1. in process, the pure translators: CPU µs per event of `ChatToMessagesStream` on the mock's
   stream (fed one event per read, as dispatch forwards them), and per request of the
   request and answer translations;
2. lb's CPU per request (utime+stime from /proc, as in proxy_bench.py) for the same chat through
   `/v1/chat/completions` (the passthrough) and `/v1/messages` (translated), non-stream and
   stream, with `lb bench` at concurrency 16 against one `lb serve` in front of one `lb mock
   --tokens 8`; the two paths alternate run by run, so a shared machine's noise falls on both.

    python bench/anthropic_cpu.py --reps 5 --requests 5000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import proxy_bench as pb

from lb.api import anthropic_translate as tr

MESSAGES = [{"role": "user", "content": "Say hello to the benchmark"}]
PATHS = {"openai": pb.CHAT, "anthropic": "/v1/messages"}


def body(path: str, stream: bool) -> str:
    payload: dict[str, Any] = {"model": pb.MODEL, "messages": MESSAGES, "stream": stream}
    if path == "anthropic":
        payload["max_tokens"] = 64
    return json.dumps(payload, separators=(",", ":"))


def mock_stream(tokens: int = 8) -> list[bytes]:
    """The mock's chat stream, one event per item: role, tokens, finish, usage, [DONE]."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": pb.MODEL}
    chunks: list[Any] = [{"role": "assistant", "content": ""}]
    chunks += [{"content": f" word{i}"} for i in range(tokens)]
    events = [b"data: " + json.dumps({**head, "choices": [
        {"index": 0, "delta": delta, "finish_reason": None}]}).encode() + b"\n\n"
        for delta in chunks]
    events.append(b"data: " + json.dumps({**head, "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode() + b"\n\n")
    events.append(b"data: " + json.dumps({**head, "choices": [], "usage": {
        "prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}}).encode()
        + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def translators(streams: int) -> dict[str, float]:
    events = mock_stream()
    started = time.process_time()
    for _ in range(streams):
        stream = tr.ChatToMessagesStream(pb.MODEL, "msg_1", 10)
        for event in events:
            stream.feed(event)
        stream.close()
    per_stream = (time.process_time() - started) / streams
    request = {"model": pb.MODEL, "max_tokens": 64, "messages": MESSAGES, "stream": True}
    answer = {"id": "x", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Lorem ipsum dolor sit amet consectetur adipiscing"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 8}}
    started = time.process_time()
    for _ in range(streams):
        tr.validate_request(request)
        tr.messages_to_chat(request)
    per_request = (time.process_time() - started) / streams
    started = time.process_time()
    for _ in range(streams):
        tr.chat_to_message(answer, pb.MODEL, "msg_1")
    per_answer = (time.process_time() - started) / streams
    return {
        "events_per_stream": len(events),
        "stream_us_per_event": per_stream / len(events) * 1e6,
        "stream_us_per_stream": per_stream * 1e6,
        "request_us": per_request * 1e6,
        "answer_us": per_answer * 1e6,
    }


def load(port: int, path: str, stream: bool, requests: int, pid: int) -> dict[str, Any]:
    """`lb bench -c 16 -n requests` with the one request of `path` (a JSONL workload line with
    its own path); lb's CPU per request over the run."""
    with tempfile.TemporaryDirectory() as tmp:
        workload = Path(tmp) / "workload.jsonl"
        workload.write_text(json.dumps(
            {"path": PATHS[path], "body": json.loads(body(path, stream))}) + "\n")
        before = pb.cpu_seconds(pid)
        done = subprocess.run(
            [*pb.LB_BENCH, f"http://{pb.HOST}:{port}", "--workload", str(workload),
             "--timeout", "20", "-c", "16", "-n", str(requests), "--json", "-"],
            capture_output=True, text=True, timeout=60 + requests / 50, check=False,
            cwd=pb.REPO,
        )
        cpu = pb.cpu_seconds(pid) - before
    if done.returncode != 0:
        raise RuntimeError(f"lb bench failed ({done.returncode}): {done.stderr[-500:]}")
    ok = int(json.loads(done.stdout)["ok"])
    return {"ok": ok, "cpu_ms_per_request": cpu * 1000 / ok if ok else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--streams", type=int, default=20000, help="in-process streams")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"translators": translators(args.streams), "runs": []}
    pure = results["translators"]
    print(f"translators: {pure['stream_us_per_event']:.1f} µs CPU per event "
          f"({pure['events_per_stream']} events, {pure['stream_us_per_stream']:.0f} µs a "
          f"stream); request {pure['request_us']:.1f} µs, answer {pure['answer_us']:.1f} µs")
    if args.reps:
        pb.raise_fd_limit()
        cluster = pb.Cluster(Path(tempfile.mkdtemp(prefix="lb-anthropic-")))
        try:
            mock = cluster.mock(8, 0, 0)
            lb = cluster.lb(mock)
            for path in PATHS:
                for stream in (False, True):
                    load(lb.port, path, stream, 1000, lb.pid)  # warm-up
            for rep in range(args.reps):
                order = list(PATHS) if rep % 2 == 0 else list(PATHS)[::-1]
                for stream in (False, True):
                    for path in order:
                        run = load(lb.port, path, stream, args.requests, lb.pid)
                        run.update(rep=rep, path=path, stream=stream)
                        results["runs"].append(run)
                        pb.log(f"rep {rep} {path} stream={stream}: "
                               f"{run['cpu_ms_per_request']:.3f} ms/req ({run['ok']} ok)")
        finally:
            cluster.close()
        for stream in (False, True):
            medians = {}
            for path in PATHS:
                values = [r["cpu_ms_per_request"] for r in results["runs"]
                          if r["path"] == path and r["stream"] == stream]
                medians[path] = statistics.median(values)
            print(f"{'stream' if stream else 'non-stream':10} lb CPU ms/req median: "
                  f"/v1/chat/completions {medians['openai']:.3f}, /v1/messages "
                  f"{medians['anthropic']:.3f} (+{medians['anthropic'] - medians['openai']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
