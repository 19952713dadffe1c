"""CPU per event of the Ollama dialect's stream translation (NDJSON -> OpenAI SSE), and per
answer of its whole-answer decode. Pure: no sockets, so the figure is the translation's alone.

    python bench/ollama_translate_cpu.py [--tokens 200] [--rounds 5] [--streams 200]

Lines are what Ollama (and the mock) send: `{"model", "created_at", "message": {"role",
"content"}, "done": false}`, one word each, then the `done: true` line with counts. Two read
patterns: one line per read (a node streaming token by token) and the whole body in one read.
"""

from __future__ import annotations

import argparse
import statistics
import time

import orjson

from lb.upstream.dialects.ollama import OllamaDialect

DIALECT = OllamaDialect()
REQUEST = {"stream": True, "stream_options": {"include_usage": True}}


def lines(tokens: int) -> list[bytes]:
    out = [
        orjson.dumps({
            "model": "llama3:8b", "created_at": "2025-01-01T00:00:00.123456Z",
            "message": {"role": "assistant", "content": f" word{i}"}, "done": False,
        }) + b"\n"
        for i in range(tokens)
    ]
    out.append(orjson.dumps({
        "model": "llama3:8b", "created_at": "2025-01-01T00:00:01.123456Z",
        "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
        "total_duration": 1, "load_duration": 1, "prompt_eval_count": 10,
        "prompt_eval_duration": 1, "eval_count": tokens, "eval_duration": 1,
    }) + b"\n")
    return out


def per_event_us(reads: list[bytes], streams: int, events: int) -> float:
    start = time.process_time()
    for _ in range(streams):
        translator = DIALECT.translator("chat", "llama3:8b", REQUEST)
        for data in reads:
            translator.feed(data)
        translator.finish()
    return (time.process_time() - start) / (streams * events) * 1e6


def decode_us(body: bytes, answers: int) -> float:
    start = time.process_time()
    for _ in range(answers):
        DIALECT.decode("chat", 200, body, "llama3:8b")
    return (time.process_time() - start) / answers * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=200)
    args = parser.parse_args()
    stream = lines(args.tokens)
    events = args.tokens + 4  # role, tokens, finish, usage, [DONE]
    answer = orjson.dumps({
        "model": "llama3:8b", "created_at": "2025-01-01T00:00:01Z",
        "message": {"role": "assistant", "content": " ".join(["word"] * args.tokens)},
        "done": True, "done_reason": "stop", "prompt_eval_count": 10,
        "eval_count": args.tokens,
    })
    rows = {
        "line per read": [per_event_us(stream, args.streams, events)
                          for _ in range(args.rounds)],
        "whole body in one read": [per_event_us([b"".join(stream)], args.streams, events)
                                   for _ in range(args.rounds)],
        "decode whole answer (per answer)": [decode_us(answer, args.streams * 10)
                                             for _ in range(args.rounds)],
    }
    print(f"tokens={args.tokens} streams={args.streams} rounds={args.rounds}")
    for name, values in rows.items():
        print(f"{name:34s} median {statistics.median(values):7.2f} us  "
              f"(min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
