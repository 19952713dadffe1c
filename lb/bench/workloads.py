"""What a bench sends, pure: the built-in workloads and the JSONL loader. Request `i` is a
function of the workload and `i` alone (a seeded rng per request), so runs are repeatable
and `--compare` can send the very same bytes both ways."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import attrs
import orjson

ENDPOINTS: dict[str, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
BUILT_IN = ("fixed", "random", "shared-prefix", "multi-turn")

# Common short English words: a prompt of N of them is roughly N tokens for most tokenizers.
_VOCABULARY = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part"
)
_WORDS = tuple(_VOCABULARY.split())
_REPLY = "Sure, here is a short answer to that."


class WorkloadError(ValueError):
    """A workload that cannot be built or a JSONL file that cannot be read (clear message)."""


@attrs.frozen
class Request:
    path: str
    body: bytes
    stream: bool


class Workload(Protocol):
    def request(self, index: int) -> Request: ...


@attrs.frozen
class BuiltIn:
    """One of BUILT_IN for one endpoint. Word counts stand in for tokens.

    fixed: the same prompt of `prompt_words` every time. random: prompts of `min_words` to
    `max_words`. shared-prefix: `prefixes` long system prompts of `prefix_words` each (request
    i uses prefix i mod prefixes) and a different user prompt of `prompt_words` after it: what
    prefix-aware routing exploits. multi-turn: `conversations` conversations; request i is turn
    (i div conversations) mod `turns` of conversation i mod conversations, carrying every
    earlier turn and a canned reply to each, so a conversation's prompt grows by turn.
    """

    kind: str = "fixed"
    endpoint: str = "chat"
    model: str = "mock-model"
    stream: bool = False
    max_tokens: int = 16
    seed: int = 0
    prompt_words: int = 32
    min_words: int = 8
    max_words: int = 512
    prefixes: int = 4
    prefix_words: int = 1024
    conversations: int = 16
    turns: int = 8
    # fixed: the one request, built once (a generator must not spend its time building it)
    _fixed: list[Request] = attrs.field(factory=list, init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.kind not in BUILT_IN:
            raise WorkloadError(f"unknown workload {self.kind!r}: one of {', '.join(BUILT_IN)}")
        if self.endpoint not in ENDPOINTS:
            raise WorkloadError(
                f"unknown endpoint {self.endpoint!r}: one of {', '.join(ENDPOINTS)}"
            )
        if self.endpoint == "embeddings" and self.stream:
            raise WorkloadError("embeddings do not stream")
        if not 1 <= self.min_words <= self.max_words:
            raise WorkloadError("random lengths need 1 <= min_words <= max_words")
        for name in ("prompt_words", "prefixes", "prefix_words", "conversations", "turns"):
            if getattr(self, name) < 1:
                raise WorkloadError(f"{name.replace('_', '-')} must be >= 1")
        if self.max_tokens < 1:
            raise WorkloadError("max-tokens must be >= 1")

    def messages(self, index: int) -> list[dict[str, str]]:
        """The conversation of request `index` (a single user message for most kinds)."""
        if self.kind == "fixed":
            return [{"role": "user", "content": _text(random.Random(self.seed), self.prompt_words)}]
        rng = random.Random(f"{self.seed}:{index}")
        if self.kind == "random":
            words = rng.randint(self.min_words, self.max_words)
            return [{"role": "user", "content": _text(rng, words)}]
        if self.kind == "shared-prefix":
            group = index % self.prefixes
            prefix = _text(random.Random(f"{self.seed}:prefix:{group}"), self.prefix_words)
            return [
                {"role": "system", "content": prefix},
                {"role": "user", "content": _text(rng, self.prompt_words)},
            ]
        conversation = index % self.conversations
        turn = (index // self.conversations) % self.turns
        messages = []
        for k in range(turn + 1):
            said = _text(random.Random(f"{self.seed}:conv:{conversation}:{k}"), self.prompt_words)
            messages.append({"role": "user", "content": said})
            if k < turn:
                messages.append({"role": "assistant", "content": _REPLY})
        return messages

    def request(self, index: int) -> Request:
        if self.kind == "fixed":
            if not self._fixed:
                self._fixed.append(self._build(0))
            return self._fixed[0]
        return self._build(index)

    def _build(self, index: int) -> Request:
        messages = self.messages(index)
        body: dict[str, Any] = {"model": self.model}
        if self.endpoint == "chat":
            body["messages"] = messages
        else:
            text = "\n\n".join(m["content"] for m in messages)
            body["input" if self.endpoint == "embeddings" else "prompt"] = text
        if self.endpoint != "embeddings":
            body["max_tokens"] = self.max_tokens
            if self.stream:
                body["stream"] = True
                # Usage in the last event: tokens/s without parsing every event.
                body["stream_options"] = {"include_usage": True}
        return Request(ENDPOINTS[self.endpoint], orjson.dumps(body), self.stream)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(_WORDS, k=words))


@attrs.frozen
class FromFile:
    """Requests from a JSONL file, sent in order and round again. A line is a request body
    (sent to `endpoint`) or {"path": "/v1/...", "body": {...}}; a body without a model gets
    `model`."""

    requests: tuple[Request, ...]

    def request(self, index: int) -> Request:
        return self.requests[index % len(self.requests)]


def parse_jsonl(lines: Iterable[str | bytes], *, endpoint: str = "chat",
                model: str = "mock-model", source: str = "<jsonl>") -> FromFile:
    if endpoint not in ENDPOINTS:
        raise WorkloadError(f"unknown endpoint {endpoint!r}: one of {', '.join(ENDPOINTS)}")
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: not JSON: {exc}") from None
        if not isinstance(item, dict):
            raise WorkloadError(f"{where}: expected a JSON object")
        path = ENDPOINTS[endpoint]
        if "body" in item:
            path = item.get("path", path)
            item = item["body"]
            if not isinstance(path, str) or not path.startswith("/"):
                raise WorkloadError(f"{where}: path must be a string starting with /")
            if not isinstance(item, dict):
                raise WorkloadError(f"{where}: body must be a JSON object")
        item.setdefault("model", model)
        requests.append(Request(path, orjson.dumps(item), item.get("stream") is True))
    if not requests:
        raise WorkloadError(f"{source}: no requests in the file")
    return FromFile(tuple(requests))


def load_jsonl(path: str | Path, *, endpoint: str = "chat", model: str = "mock-model") -> FromFile:
    try:
        with open(path, "rb") as f:
            return parse_jsonl(f, endpoint=endpoint, model=model, source=str(path))
    except OSError as exc:
        raise WorkloadError(f"{path}: {exc.strerror}") from None
