"""The `Dialect` seam: what speaking to one kind of node takes, with OpenAI's chat format as
the common language in between.

A dialect turns an OpenAI-shaped request into the node's own (path, body, credentials) and the
node's answer back into OpenAI's (a whole JSON answer, an error, or a stream through a
`StreamTranslator`). OpenAI-compatible nodes are the identity (`passthrough`): their bytes go
through untouched and no method here runs on their requests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from lb.http.types import Headers
from lb.routing.resolve import ModelKind


def starts_stream(status: int, headers: Headers, content_type: bytes) -> bool:
    """Whether an answer head starts a stream of `content_type` (a 200 of that type)."""
    if status != 200:
        return False
    for key, value in headers:
        if key == b"content-type":
            return value.startswith(content_type)
    return False


class StreamIncomplete(Exception):
    """The node's stream ended without its end marker (it died mid-answer)."""


class StreamFailed(Exception):
    """The node reported an error inside its stream; the message says what, for a client."""


class StreamTranslator(Protocol):
    """A node's streamed answer -> OpenAI SSE bytes, one request at a time (stateful)."""

    def feed(self, data: bytes) -> bytes:
        """Node bytes, split at any position -> the whole OpenAI SSE events they complete
        (`data: {...}\\n\\n` each; may be b"")."""
        ...

    def finish(self) -> bytes:
        """The node's body ended: the closing events (a usage chunk when the client asked for
        one, then `data: [DONE]\\n\\n`). Raises `StreamIncomplete` if the node never said it
        was done."""
        ...

    @property
    def usage(self) -> tuple[int, int] | None:
        """(prompt_tokens, completion_tokens) once the node reported them."""
        ...


class Dialect(Protocol):
    name: str  # "openai", "anthropic", "ollama"
    passthrough: bool  # True only for the OpenAI-compatible identity

    def path(self, kind: ModelKind, stream: bool) -> str:
        """The node's path for this kind of request; `lb.errors.BadRequest` if the provider
        has no such endpoint (e.g. Anthropic embeddings)."""
        ...

    def encode(self, kind: ModelKind, body: Mapping[str, Any], model: str) -> bytes:
        """The OpenAI-shaped request `body` as the node's request body, for the node's own
        model name `model`. `lb.errors.BadRequest` for what cannot be expressed."""
        ...

    def auth(self, api_key: str) -> Headers:
        """The headers that carry lb's credential for this node (never the client's)."""
        ...

    def is_stream(self, status: int, headers: Headers) -> bool:
        """Whether this answer head starts a stream (SSE, or Ollama's NDJSON)."""
        ...

    def decode(self, kind: ModelKind, status: int, body: bytes, model: str) -> bytes:
        """A whole (non-stream) answer -> OpenAI JSON: a 2xx answer in OpenAI's shape, an error
        (4xx) as OpenAI's `{"error": {...}}` with the node's message. `model`: the model name
        the client should see."""
        ...

    def translator(
        self, kind: ModelKind, model: str, request: Mapping[str, Any]
    ) -> StreamTranslator:
        """A translator for one streamed answer; `request` is the client's OpenAI body (for
        `stream_options.include_usage`), `model` the name the client should see."""
        ...

    def models(self, payload: Any) -> tuple[str, ...]:
        """The model names in the node's model list answer (ValueError if it is not one)."""
        ...
