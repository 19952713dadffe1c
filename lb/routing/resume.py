"""STREAM_RESUME: the pure parts of continuing a broken stream on another node.

When a node fails after lb has forwarded part of a stream, the client already holds the head,
a role chunk and some text. Dispatch can send the same request to another node with that text
as a trailing assistant message and forward only what comes after it, so that the client sees
one answer. This module owns what needs no I/O:

- `StreamTranscript` watches the OpenAI chat (or completions) events that went to the client:
  the text so far, the stream's id/model/created, whether a role chunk went out, and what
  makes a stream impossible to continue (tool calls, several choices, a cut inside reasoning).
- `continuation` builds the request for the next node: the original messages plus the text so
  far, as native prefill (`continue_final_message: true, add_generation_prompt: false`, which
  vLLM reads; llama.cpp's server and Ollama prefill a trailing assistant message by themselves)
  or, in `instruction` mode, followed by a short user message asking to go on. A completions
  request gets the text appended to its prompt, which every server continues natively.
- `Rewriter` turns the next node's events into the original stream's: the original id, model
  and created, no second role chunk, one `[DONE]`, usage summed.

Usage, as the client sees it (when it asked for a usage chunk): `completion_tokens` counts the
tokens of the whole answer (the events before the cut, one token each, plus the continuation's
own count) and `prompt_tokens` is the continuation's prompt minus those carried tokens, that is
about the client's own prompt: the text resent as prefill is lb's cost, not the client's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

PREFILL = "prefill"
INSTRUCTION = "instruction"
MODES = (PREFILL, INSTRUCTION)
# Anthropic's Messages API continues a trailing assistant message by itself (it is a prefill
# there); no flag is sent, and the text may not end in whitespace.
NATIVE = "native"
DEFAULT_PROMPT = (
    "Your previous answer was cut off. Continue it from exactly where it stopped, even in the "
    "middle of a word or sentence. Do not repeat anything and do not mention the interruption."
)

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


def events(data: bytes) -> list[bytes]:
    """The events in `data` (whole events, as lb's EventSplitter passes them), each without
    its blank line."""
    return [part for part in _EVENT_END.split(data) if part.strip(b"\r\n")]


def data_of(event: bytes) -> bytes | None:
    """The `data` field of one SSE event (several data lines joined by LF), or None if it has
    none (a comment, an `event:` line alone)."""
    found: list[bytes] = []
    for line in _LINE_END.split(event):
        if line.startswith(b"data:"):
            value = line[5:]
            found.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(found) if found else None


class StreamTranscript:
    """What the client received of an OpenAI chat or completions stream so far.

    `feed` takes the bytes forwarded to the client (whole events); `note` takes one decoded
    chunk (the `Rewriter` hands over the continuation's chunks after rewriting them).
    """

    __slots__ = (
        "broken", "chat", "choices", "content_events", "created", "done", "finish_reason",
        "id", "model", "object", "parts", "reasoning", "role_sent", "tools",
    )

    def __init__(self, chat: bool = True) -> None:
        self.chat = chat  # chat chunks carry `delta`; completions chunks carry `text`
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.object: str | None = None
        self.parts: list[str] = []
        self.content_events = 0  # events that carried text: about one token each
        self.role_sent = False
        self.tools = False  # tool or function calls: their arguments cannot be continued
        self.reasoning = False  # reasoning deltas came (before any text: not resumable)
        self.choices = False  # a choice other than index 0 (n > 1)
        self.broken = False  # an event lb could not read (an oversized half event)
        self.finish_reason: str | None = None
        self.done = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def resumable(self) -> bool:
        """Whether another node can continue this answer without a visible seam."""
        if self.tools or self.choices or self.broken or self.done:
            return False
        return not (self.reasoning and not self.parts)

    def feed(self, data: bytes) -> None:
        for event in events(data):
            payload = data_of(event)
            if payload is None:
                continue
            if payload.strip() == _DONE:
                self.done = True
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self.broken = True
                continue
            if isinstance(chunk, dict):
                self.note(chunk)

    def note(self, chunk: dict[str, Any]) -> None:
        """Record one decoded chunk."""
        if self.id is None:
            ident, model, created = chunk.get("id"), chunk.get("model"), chunk.get("created")
            if isinstance(ident, str):
                self.id = ident
                self.model = model if isinstance(model, str) else None
                self.created = created if isinstance(created, int) else None
                kind = chunk.get("object")
                self.object = kind if isinstance(kind, str) else None
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0:
                self.choices = True
                continue
            if self.chat:
                self._delta(choice.get("delta"))
            else:
                text = choice.get("text")
                if isinstance(text, str) and text:
                    self.parts.append(text)
                    self.content_events += 1
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.finish_reason = reason

    def _delta(self, delta: Any) -> None:
        if not isinstance(delta, dict):
            return
        if delta.get("role"):
            self.role_sent = True
        content = delta.get("content")
        if isinstance(content, str) and content:
            self.parts.append(content)
            self.content_events += 1
        if delta.get("tool_calls") or delta.get("function_call"):
            self.tools = True
        if delta.get("reasoning_content") or delta.get("reasoning"):
            self.reasoning = True


def request_resumable(body: Mapping[str, Any], chat: bool) -> bool:
    """Whether a request's answer could be continued at all: one choice, and for completions a
    text prompt that is not echoed back (a continuation would echo the text so far again)."""
    if body.get("n", 1) not in (1, None) or body.get("best_of", 1) not in (1, None):
        return False
    if chat:
        return isinstance(body.get("messages"), list)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return isinstance(prompt, str) and not body.get("echo")


def continuation(
    body: Mapping[str, Any], transcript: StreamTranscript, mode: str = PREFILL,
    prompt: str = DEFAULT_PROMPT,
) -> dict[str, Any]:
    """The request that continues `body`'s answer after the text in `transcript`."""
    text = transcript.text
    out = dict(body)
    out["stream"] = True
    carried = transcript.content_events
    for key in ("max_tokens", "max_completion_tokens"):
        limit = out.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool):
            out[key] = max(1, limit - carried)  # what is left of the answer's budget
    if not transcript.chat:
        original = out["prompt"]
        if isinstance(original, list):
            original = original[0]
        out["prompt"] = original + text
        return out
    if not text:  # nothing but the role chunk went out: the request again, as it was
        return out
    if mode == NATIVE:
        text = text.rstrip()
        if not text:
            return out
    messages = [*out["messages"], {"role": "assistant", "content": text}]
    if mode == NATIVE:
        pass
    elif mode == INSTRUCTION:
        messages.append({"role": "user", "content": prompt})
    else:
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
    out["messages"] = messages
    return out


class Rewriter:
    """Turns a continuation's events into more of the original stream (see the module
    docstring); the continuation's chunks are noted in `transcript` as they pass."""

    __slots__ = ("carried", "chat", "transcript", "usage_seen")

    def __init__(self, transcript: StreamTranscript) -> None:
        self.transcript = transcript
        self.chat = transcript.chat
        self.carried = transcript.content_events  # tokens the client got before this resume
        self.usage_seen = False

    def feed(self, data: bytes) -> bytes:
        """The client's bytes for these whole continuation events (b"" when none are left)."""
        out: list[bytes] = []
        for event in events(data):
            payload = data_of(event)
            if payload is None:  # a comment or a bare field: harmless as it is
                out.append(event + b"\n\n")
                continue
            if payload.strip() == _DONE:
                if not self.transcript.done:
                    self.transcript.done = True
                    out.append(DONE_EVENT)
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self.transcript.broken = True
                out.append(event + b"\n\n")
                continue
            if not isinstance(chunk, dict) or "error" in chunk:
                out.append(event + b"\n\n")  # the node's own error event: the client's to see
                continue
            rewritten = self.rewrite(chunk)
            if rewritten is not None:
                out.append(b"data: " + orjson.dumps(rewritten) + b"\n\n")
        return b"".join(out)

    def rewrite(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """One continuation chunk as part of the original stream, or None to drop it."""
        transcript = self.transcript
        if transcript.id is None:  # nothing identified the stream yet: this one does
            transcript.note({k: chunk.get(k) for k in ("id", "model", "created", "object")})
        chunk = dict(chunk)
        for key, value in (
            ("id", transcript.id), ("model", transcript.model), ("created", transcript.created)
        ):
            if value is not None and key in chunk:
                chunk[key] = value
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            chunk["usage"] = self._usage(usage)
            self.usage_seen = True
        choices = chunk.get("choices")
        if self.chat and isinstance(choices, list) and choices:
            kept = [c for c in (self._choice(c) for c in choices) if c is not None]
            if not kept and not isinstance(usage, dict):
                return None  # a role chunk or an empty first delta: the client has had one
            chunk["choices"] = kept
        transcript.note(chunk)
        return chunk

    def _choice(self, choice: Any) -> Any:
        if not isinstance(choice, dict):
            return choice
        delta = choice.get("delta")
        if not isinstance(delta, dict) or "role" not in delta:
            return choice
        delta = {k: v for k, v in delta.items() if k != "role"}
        if not self.transcript.role_sent:
            # The client never got a role chunk (the first node died before sending one):
            # this one is the stream's first.
            return choice
        if not delta.get("content") and choice.get("finish_reason") is None and not any(
            value for key, value in delta.items() if key != "content"
        ):
            return None
        return {**choice, "delta": delta}

    def _usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return usage
        prompt, completion = self.whole(prompt, completion)
        summed = {k: v for k, v in usage.items() if k != "prompt_tokens_details"}
        summed.update(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
        return summed

    def whole(self, prompt: int, completion: int) -> tuple[int, int]:
        """The answer's usage from the continuation's: the text carried over was lb's prompt,
        and the client's completion."""
        carried = self.carried
        return max(0, prompt - carried), completion + carried
