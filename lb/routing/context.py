"""Context windows: a cheap estimate of a request's prompt tokens, and what to do when it is
more than a model group's known window (a `context_window_fallbacks` group, or a 400).

Pure. Dispatch asks only for handles in `Catalogue.limited`, so a request to a model with no
known window never pays for the estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from lb.catalogue import Catalogue
from lb.errors import ContextWindowExceeded
from lb.routing.resolve import ModelKind

__all__ = [
    "BYTES_PER_TOKEN",
    "TOKENS_PER_IMAGE",
    "TOKENS_PER_MESSAGE",
    "check_context",
    "estimate_tokens",
]

#: Bytes of UTF-8 text per token, a cheap stand-in for a tokenizer. English runs at about 4
#: with OpenAI's and Llama's tokenizers; code and CJK text use more tokens per byte, so this
#: under-counts them, which errs towards letting a node decide rather than refusing.
BYTES_PER_TOKEN = 4
#: Per message: role and framing tokens (OpenAI's chat format spends 3-4).
TOKENS_PER_MESSAGE = 4
#: Per image part: OpenAI's low-detail image cost; larger images cost more upstream.
TOKENS_PER_IMAGE = 85


def estimate_tokens(body: Mapping[str, Any], kind: ModelKind) -> int:
    """A cheap estimate of a request's prompt tokens (no tokenizer): UTF-8 bytes of its text
    / BYTES_PER_TOKEN, rounded up, plus TOKENS_PER_MESSAGE per chat message and
    TOKENS_PER_IMAGE per image. Adding text or messages never lowers it."""
    size = 0
    extra = 0
    if kind == "chat":
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                extra += TOKENS_PER_MESSAGE
                if not isinstance(message, dict):  # JSON objects; an ABC check costs more
                    continue
                part_bytes, images = _content_bytes(message.get("content"))
                size += part_bytes
                extra += images * TOKENS_PER_IMAGE
                name = message.get("name")
                if isinstance(name, str):
                    size += _utf8_len(name)
                call_id = message.get("tool_call_id")
                if isinstance(call_id, str):
                    size += _utf8_len(call_id)
                calls = message.get("tool_calls")
                if isinstance(calls, list):
                    size += _json_bytes(calls)
        for key in ("tools", "functions"):
            if body.get(key):
                size += _json_bytes(body[key])
    else:
        field = "prompt" if kind == "completion" else "input"
        size, tokens = _input_bytes(body.get(field))
        extra += tokens
    return -(-size // BYTES_PER_TOKEN) + extra


def _utf8_len(text: str) -> int:
    # ASCII (most prompts) needs no encoding to be measured.
    return len(text) if text.isascii() else len(text.encode())


def _content_bytes(content: Any) -> tuple[int, int]:
    if isinstance(content, str):
        return _utf8_len(content), 0
    size = images = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str):
                size += _utf8_len(text)
            elif part.get("type") in ("image_url", "image", "input_image"):
                images += 1
    return size, images


def _input_bytes(value: Any) -> tuple[int, int]:
    """(bytes of text, tokens given as token ids) of a prompt or embedding input."""
    if isinstance(value, str):
        return _utf8_len(value), 0
    if isinstance(value, list):
        if all(isinstance(item, int) for item in value):
            return 0, len(value)
        size = tokens = 0
        for item in value:
            item_size, item_tokens = _input_bytes(item)
            size += item_size
            tokens += item_tokens
        return size, tokens
    return 0, 0


def _json_bytes(value: Any) -> int:
    try:
        return len(orjson.dumps(value))
    except TypeError:
        return 0


def check_context(catalogue: Catalogue, handle: str, estimate: int) -> str:
    """The group to send a prompt of `estimate` tokens to: `handle` when it fits (or the group
    has no known limit), else the first of its `context_window_fallbacks` that fits; raises
    `ContextWindowExceeded` when none does. Call only for handles in `catalogue.limited`."""
    limit = catalogue.max_input_tokens(handle)
    if limit is None or estimate <= limit:
        return handle
    for candidate in catalogue.context_window_fallbacks.get(handle, ()):
        group = catalogue.group_for(candidate) or candidate
        larger = catalogue.max_input_tokens(group)
        if larger is None or estimate <= larger:
            return group
    raise ContextWindowExceeded(
        f"This request's prompt is about {estimate} tokens; the model '{handle}' takes at most "
        f"{limit} and no context window fallback takes more. Shorten the messages.",
        param="messages",
    )
