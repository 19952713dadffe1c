"""Log lines: the request id every line carries, the text and JSON formats, and the one place
the process's logging is set up (`configure_logging`, called by `lb serve`).

The server sets `REQUEST_ID` when it assigns a request its id and clears it when the request
ends; trio tasks inherit their parent's context, so whatever runs for the request (dispatch's
attempts, breaker warnings) logs with it. `RequestIdFilter`, on the handler, copies it onto each
record as `request_id`; it costs nothing for lines a disabled level drops before any handler.

Access lines (`lb.access`) carry their fields as the record attribute `access` (a dict, built
when a handler formats the line; `is_access` marks them): the
JSON format puts them at the top level of the line's object.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, TextIO

import orjson
import trio

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
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # One strftime per second, not per line (an access line per request adds up).
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, super().formatTime(record, datefmt)[:-4]
        return f"{self._stamp},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        request_id = fields.get("request_id")
        if request_id is None or getattr(record, "is_access", False):
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
        access = getattr(record, "access", None)
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


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that does not flush after every line: info lines (an access line per
    request) are written when `BATCH_BYTES` have gathered or `flush()` is called — lb calls it
    every `FLUSH_SECS`, and at exit — while warnings and errors go out at once."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._size = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._size += len(line)
        if record.levelno >= logging.WARNING or self._size >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # set by Handler.createLock
            if self._pending:
                lines, self._pending, self._size = self._pending, [], 0
                # A closed or broken log stream must not take a request down.
                with contextlib.suppress(Exception):
                    self.stream.write("".join(lines))
            super().flush()


BATCH_BYTES = 16 * 1024
FLUSH_SECS = 0.5


def make_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing `log_format` lines (text or json) to `stream` (stderr), with the
    request id filter."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = BatchingHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler.set_name("lb")
    return handler


def configure_logging(
    level: str, log_format: str = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Every log line of the process through one handler at `level`, in `log_format`; replaces
    the handler an earlier call installed. Returns the handler."""
    # Documented savings (logging HOWTO, "Optimization"): no line says where it was logged
    # from, nor which thread or process wrote it, so the stack walk and lookups are skipped.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
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


async def flush_logs_forever() -> None:
    """Flush the batched log lines every FLUSH_SECS (run by `lb serve`)."""
    while True:
        await trio.sleep(FLUSH_SECS)
        flush_logs()


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
