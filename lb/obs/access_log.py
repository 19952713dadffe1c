"""The access log: one line per finished proxied request, at info level on logger `lb.access`.

The line's fields (`access_fields`) go with the record as its `access` attribute, so the JSON
format (`lb.obs.logs`) writes them as top-level keys; the message is the readable text line
(`access_text`); both are built only when a handler formats the record:

    req=<id> POST /v1/chat/completions model=auto resolved=llama-3.1-8b stream
    node=127.0.0.1:9001 status=200 attempts=1 ms=12.3 ttfb_ms=4.1 tokens=5+16
    upstream=<node's id> client=127.0.0.1:50412

(on one line). Fields lb does not know are left out of the text (`null` in JSON); `resolved`
only when it differs from the model asked for; `tokens=<prompt>+<completion>`, `?` for a count
not known and `~` before a completion count estimated from the stream's events; flags `stream`
and `client_gone` when true; `hedges=N` when hedging started N of the attempts; `error=<code>`
when the client got one. A value that is empty or holds a space, a quote or a control character
is written as a JSON string. No header is ever logged: keys, cookies and `Authorization` never
reach a log line.

When info is off for `lb.access`, `finished` returns before building anything.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from lb.obs.observer import Observer, Trace

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
        "hedges": trace.hedges,
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


def access_text(trace: Trace) -> str:
    """The readable access line (the same fields as `access_fields`, read from the trace
    directly: this runs for every request)."""
    model = trace.requested_model
    resolved = trace.model
    parts = [f"req={trace.request_id} POST {_value(trace.path)}"]
    if model:
        parts.append(f"model={_value(model)}")
    if resolved is not None and resolved != model:
        parts.append(f"resolved={_value(resolved)}")
    if trace.stream:
        parts.append("stream")
    if trace.node is not None:
        parts.append(f"node={trace.node}")
    if trace.hedges:  # HEDGE_AFTER_MS: attempts started beside a slow one (of `attempts`)
        parts.append(f"hedges={trace.hedges}")
    parts.append(f"status={trace.status} attempts={trace.attempts} ms={trace.duration * 1000:.1f}")
    if trace.first_byte is not None:
        parts.append(f"ttfb_ms={trace.first_byte * 1000:.1f}")
    prompt, completion = trace.prompt_tokens, trace.completion_tokens
    if prompt is not None or completion is not None:
        estimated = "~" if trace.usage_estimated else ""
        parts.append(
            f"tokens={'?' if prompt is None else prompt}+"
            f"{'?' if completion is None else f'{estimated}{completion}'}"
        )
    if trace.error is not None:
        parts.append(f"error={_value(trace.error)}")
    if trace.upstream_request_id is not None:
        parts.append(f"upstream={_value(trace.upstream_request_id)}")
    if trace.client:
        parts.append(f"client={_value(trace.client)}")
    if trace.client_gone:
        parts.append("client_gone")
    return " ".join(parts)


class AccessRecord(logging.LogRecord):
    """An access line's record, made without what `LogRecord.__init__` works out for every
    line (caller, thread, process: none of it belongs in an access line), and with its text
    and fields built only when a handler formats it."""

    is_access = True

    def __init__(self, name: str, trace: Trace) -> None:
        # Not calling super().__init__ on purpose: this sets what formatters read.
        created = time.time()
        self.name = name
        self.msg = ""
        self.args = None
        self.levelno = _INFO
        self.levelname = "INFO"
        self.pathname = self.filename = self.module = "access"
        self.exc_info = None
        self.exc_text = None
        self.stack_info = None
        self.lineno = 0
        self.funcName = ""
        self.created = created
        self.msecs = (created - int(created)) * 1000
        self.relativeCreated = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
        self.thread = self.threadName = self.process = self.processName = None
        self.request_id = trace.request_id
        self._trace = trace
        self._fields: dict[str, Any] | None = None
        self._text: str | None = None

    @property
    def access(self) -> dict[str, Any]:
        """The line's fields (the JSON format writes them as top-level keys)."""
        if self._fields is None:
            self._fields = access_fields(self._trace)
        return self._fields

    def getMessage(self) -> str:
        if self._text is None:
            self._text = access_text(self._trace)
        return self._text


class AccessLog(Observer):
    """The request observer that writes the access log."""

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    def finished(self, trace: Trace) -> None:
        logger = self.logger
        if logger.isEnabledFor(_INFO):
            logger.handle(AccessRecord(logger.name, trace))
