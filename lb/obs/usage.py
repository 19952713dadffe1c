"""Token usage peeked from a node's answer without decoding it whole: the `usage` object of a
JSON answer, or of a stream's usage chunk; for streams without one, an estimate from the number
of content-carrying events. Pure; no copy of the body."""

from __future__ import annotations

import re

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
# A stream event that carries generated text (OpenAI chat and completions chunks).
_CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"(?!")')


def usage_of(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last `"usage": {...}` in `data`, if any."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    tail = data[at : at + 512]  # the usage object is small; its details, if any, come after
    prompt = _PROMPT.search(tail)
    completion = _COMPLETION.search(tail)
    if prompt is None:
        return None
    return int(prompt.group(1)), int(completion.group(1)) if completion else 0


def content_events(data: bytes) -> int:
    """How many events in `data` carry non-empty generated text (about one token each)."""
    return len(_CONTENT.findall(data))
