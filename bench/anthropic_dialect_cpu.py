"""CPU cost of the Anthropic dialect's pure translators (no sockets): the stream translator per
Anthropic event, `encode` per request and `decode` per answer.

    python bench/anthropic_dialect_cpu.py [--tokens 200] [--rounds 7] [--per-read 1]

The stream is what the mock Anthropic node sends for a `--tokens`-token answer (one
`text_delta` per token, as the real API streams), fed `--per-read` events per `feed` call (a
socket read usually holds one or a few). Reported: the median over rounds of CPU time
(time.process_time) per Anthropic event in.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import orjson

from lb.testing.mock import _token_text
from lb.testing.mock_anthropic import stream_events
from lb.upstream.dialects.anthropic import ANTHROPIC

REQUEST = {
    "model": "main",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 20},
        *[
            {"role": "user" if i % 2 == 0 else "assistant", "content": "Some earlier turn. " * 30}
            for i in range(8)
        ],
        {"role": "user", "content": "What is the weather in Paris?"},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}],
    "temperature": 0.7, "max_tokens": 512, "stream": True,
}


def per_call(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Median CPU microseconds per call of `fn`."""
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            fn()
        samples.append((time.process_time() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-read", type=int, default=1)
    args = parser.parse_args()

    head = {"id": "msg_bench", "type": "message", "role": "assistant", "model": "claude"}
    usage = {"input_tokens": 300, "output_tokens": args.tokens}
    pieces = [_token_text(i) for i in range(args.tokens)]
    events = stream_events(head, [("text", pieces)], "end_turn", None, usage)
    reads = [b"".join(events[i:i + args.per_read]) for i in range(0, len(events), args.per_read)]

    def translate() -> None:
        translator = ANTHROPIC.translator("chat", "main", {"stream_options": {
            "include_usage": True}})
        for read in reads:
            translator.feed(read)
        translator.finish()

    stream_us = per_call(translate, 50, args.rounds)
    print(f"stream: {len(events)} Anthropic events, {args.per_read} per read: "
          f"{stream_us:.0f} us per stream, {stream_us / len(events):.2f} us per event")

    encode_us = per_call(lambda: ANTHROPIC.encode("chat", REQUEST, "claude"), 2000, args.rounds)
    print(f"encode: {len(orjson.dumps(REQUEST))}-byte request: {encode_us:.1f} us")

    message = orjson.dumps({**head, "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": "end_turn", "stop_sequence": None, "usage": usage})
    decode_us = per_call(lambda: ANTHROPIC.decode("chat", 200, message, "main"), 2000,
        args.rounds)
    print(f"decode: {len(message)}-byte answer: {decode_us:.1f} us")


if __name__ == "__main__":
    main()
