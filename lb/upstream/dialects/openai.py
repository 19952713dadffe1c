"""OpenAI-compatible nodes (llama.cpp, vLLM, LM Studio, Ollama's `/v1`, OpenAI itself): the
identity dialect. Dispatch sends the client's bytes on untouched and never calls `decode` or
`translator` for them; `encode` runs only when a catalogue gives the node its own name for the
model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from lb.http.types import Headers
from lb.routing.resolve import ModelKind
from lb.upstream.dialects.base import StreamTranslator, starts_stream

PATHS: dict[ModelKind, str] = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
}


class OpenAIDialect:
    name = "openai"
    passthrough = True

    def path(self, kind: ModelKind, stream: bool) -> str:
        return PATHS[kind]

    def encode(self, kind: ModelKind, body: Mapping[str, Any], model: str) -> bytes:
        return orjson.dumps({**body, "model": model})

    def auth(self, api_key: str) -> Headers:
        return [(b"authorization", b"Bearer " + api_key.encode())]

    def is_stream(self, status: int, headers: Headers) -> bool:
        return starts_stream(status, headers, b"text/event-stream")

    def decode(self, kind: ModelKind, status: int, body: bytes, model: str) -> bytes:
        return body

    def translator(
        self, kind: ModelKind, model: str, request: Mapping[str, Any]
    ) -> StreamTranslator:
        raise NotImplementedError("OpenAI-compatible streams pass through untouched")

    def models(self, payload: Any) -> tuple[str, ...]:
        from lb.cluster.scanner import parse_openai_models  # the scanner owns discovery parsing

        return parse_openai_models(payload)


OPENAI = OpenAIDialect()
