"""The access log: one line per finished proxied request, at info level on logger `lb.access`.

The line's fields (`access_fields`) go with the record as its `access` attribute, so the JSON
format (`lb.obs.logs`) writes them as top-level keys; the message is the readable text line
(`access_text`):

    req=<id> POST /v1/chat/completions model=auto resolved=llama-3.1-8b stream
    node=127.0.0.1:9001 status=200 attempts=1 ms=12.3 ttfb_ms=4.1 tokens=5+16
    upstream=<node's id> client=127.0.0.1:50412

(on one line). Fields lb does not know are left out of the text (`null` in JSON); `resolved`
only when it differs from the model asked for; `tokens=<prompt>+<completion>`, `?` for a
count not known and `~` before a completion count estimated from the stream's events; flags
`stream` and `client_gone` when true; `error=<code>` when the client got one. A value that is
empty or holds a space, a quote or a control character is written as a JSON string. No header
is ever logged: keys, cookies and `Authorization` never reach a log line.

When info is off for `lb.access`, `finished` returns before building anything.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lb.obs.observer import Outcome, Trace

ACCESS_LOGGER = "lb.access"
_INFO = logging.INFO


def access_fields(trace: Trace) -> dict[str, Any]:
    """The access line's fields, in their order (the JSON object's keys)."""
    first_byte = trace.first_byte
    return {
        "request_id": trace.request_id,
        "method": "POST",  # every proxied endpoint is a POST
        "path": trace.path,
        "model": trace.requested_model,
        "resolved_model": trace.model,
        "stream": trace.stream,
        "node": trace.node,
        "status": trace.status,
        "attempts": trace.attempts,
        "duration_ms": round(trace.duration * 1000, 1),
        "ttfb_ms": None if first_byte is None else round(first_byte * 1000, 1),
        "prompt_tokens": trace.prompt_tokens,
        "completion_tokens": trace.completion_tokens,
        "tokens_estimated": trace.usage_estimated,
        "error": trace.error,
        "upstream_request_id": trace.upstream_request_id,
        "client": trace.client,
        "client_gone": trace.client_gone,
    }


def _value(text: str) -> str:
    """`text` as is when it is one plain word, else as a JSON string (no forged lines)."""
    if text and text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text)


def access_text(fields: dict[str, Any]) -> str:
    """The readable access line of `access_fields`."""
    model = fields["model"]
    resolved = fields["resolved_model"]
    parts = [f"req={fields['request_id']} {fields['method']} {_value(fields['path'])}"]
    if model:
        parts.append(f"model={_value(model)}")
    if resolved is not None and resolved != model:
        parts.append(f"resolved={_value(resolved)}")
    if fields["stream"]:
        parts.append("stream")
    if fields["node"] is not None:
        parts.append(f"node={fields['node']}")
    parts.append(f"status={fields['status']} attempts={fields['attempts']} "
                 f"ms={fields['duration_ms']:.1f}")
    if fields["ttfb_ms"] is not None:
        parts.append(f"ttfb_ms={fields['ttfb_ms']:.1f}")
    prompt, completion = fields["prompt_tokens"], fields["completion_tokens"]
    if prompt is not None or completion is not None:
        estimated = "~" if fields["tokens_estimated"] else ""
        parts.append(
            f"tokens={'?' if prompt is None else prompt}+"
            f"{'?' if completion is None else f'{estimated}{completion}'}"
        )
    if fields["error"] is not None:
        parts.append(f"error={_value(fields['error'])}")
    if fields["upstream_request_id"] is not None:
        parts.append(f"upstream={_value(fields['upstream_request_id'])}")
    if fields["client"]:
        parts.append(f"client={_value(fields['client'])}")
    if fields["client_gone"]:
        parts.append("client_gone")
    return " ".join(parts)


class AccessLog:
    """The request observer that writes the access log."""

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    def started(self, trace: Trace) -> None:
        pass

    def queued(self, trace: Trace, seconds: float) -> None:
        pass

    def attempt_finished(
        self, trace: Trace, node: str, outcome: Outcome, status: int | None, seconds: float
    ) -> None:
        pass

    def first_byte(self, trace: Trace, seconds: float) -> None:
        pass

    def finished(self, trace: Trace) -> None:
        logger = self.logger
        if not logger.isEnabledFor(_INFO):
            return
        fields = access_fields(trace)
        logger.info(access_text(fields), extra={"access": fields})
