"""Log lines: the request id every line carries, the text and JSON formats, and the one place
the process's logging is set up (`configure_logging`, called by `lb serve`).

The server sets `REQUEST_ID` when it assigns a request its id and clears it when the request
ends; trio tasks inherit their parent's context, so whatever runs for the request (dispatch's
attempts, breaker warnings) logs with it. `RequestIdFilter`, on the handler, copies it onto each
record as `request_id`; it costs nothing for lines a disabled level drops before any handler.

Access lines (`lb.access`) carry their fields as the record attribute `access` (a dict): the
JSON format puts them at the top level of the line's object.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, TextIO

import orjson

FORMATS = ("text", "json")

# The id of the request the current task works for; None outside requests.
REQUEST_ID: ContextVar[str | None] = ContextVar("lb_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (None outside a request) to every record its handler sees; a record
    that brought its own (an access line) keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "request_id" not in record.__dict__:
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger> [req=<id>]: <message>`; the bracket only inside a request, and
    not on access lines, whose message begins with `req=<id>` itself."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        request_id = fields.get("request_id")
        if request_id is None or "access" in fields:
            return super().formatMessage(record)
        return (
            f"{record.asctime} {record.levelname} {record.name} [req={request_id}]: "
            f"{record.message}"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id when
    there is one, an access line's fields, and the traceback (`exc_info`) if any."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = fields.get("request_id")
        if request_id is not None:
            line["request_id"] = request_id
        access = fields.get("access")
        if access is not None:
            line.update(access)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(line).decode()
        except TypeError:  # a lone surrogate (orjson refuses them) or an odd access value
            return json.dumps(line, default=str)


def make_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing `log_format` lines (text or json) to `stream` (stderr), with the
    request id filter."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler.set_name("lb")
    return handler


def configure_logging(
    level: str, log_format: str = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Every log line of the process through one handler at `level`, in `log_format`; replaces
    the handler an earlier call installed. Returns the handler."""
    root = logging.getLogger()
    for old in [handler for handler in root.handlers if handler.get_name() == "lb"]:
        root.removeHandler(old)
        old.close()
    handler = make_handler(log_format, stream)
    root.addHandler(handler)
    number = logging.getLevelName(level.upper())
    root.setLevel(number)
    # httpx logs every health probe at INFO; lb reports node changes itself.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, number))
    return handler
