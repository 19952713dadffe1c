"""Fault specs for the mock node, parsed by a pure function so they can be property-tested.

A spec is a comma-separated list of `key=value` items, the same grammar node-wide (`fault=`,
`POST /mock/fault`) and per request (header `x-mock-fault`):

    status=503        answer that status (400-599) with an OpenAI error body
    rate=0.5          apply the whole spec to that fraction of requests (default 1)
    hang=1            accept the request and never answer until the client goes away
    drop-after=N      streams: close the connection abruptly after N SSE events;
                      non-stream: close without an answer body when N=0
    drop-after-done=1 streams: send every event, `data: [DONE]` included, then close the
                      connection abruptly without the chunked body's last chunk (what
                      llama-cpp-python does when the context fills); non-stream: no effect
    ttft-ms=F         delay before the first token / the JSON answer
    itl-ms=F          delay between stream tokens
    tokens=N          completion tokens per answer
    retry-after=N     with status: send a Retry-After header of N seconds
    error-after=N     streams: after N events, an in-stream error event ends the stream
                      (OpenAI: `data: {"error": ...}` then `[DONE]`; Anthropic:
                      `event: error`, `overloaded_error`); the connection stays sound

`hang` alone means `hang=1`; `_` may stand for `-` in keys; blanks around items are ignored.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import attrs

MAX_TOKENS = 100_000


class FaultSpecError(ValueError):
    """A spec item that cannot be parsed; the message names the item."""

    def __init__(self, item: str, reason: str) -> None:
        super().__init__(f"bad fault item {item!r}: {reason}")
        self.item = item
        self.reason = reason


@attrs.frozen
class FaultSpec:
    status: int | None = None
    rate: float = 1.0
    hang: bool = False
    drop_after: int | None = None
    drop_after_done: bool = False
    ttft_ms: float | None = None
    itl_ms: float | None = None
    tokens: int | None = None
    retry_after: int | None = None
    error_after: int | None = None

    @property
    def empty(self) -> bool:
        """True when applying the spec changes nothing (whatever its rate)."""
        return (
            self.status is None and not self.hang and self.drop_after is None
            and not self.drop_after_done and self.ttft_ms is None and self.itl_ms is None
            and self.tokens is None and self.retry_after is None
            and self.error_after is None
        )

    def format(self) -> str:
        """The canonical text of the spec; `parse_fault(spec.format()) == spec`."""
        items: list[str] = []
        if self.status is not None:
            items.append(f"status={self.status}")
        if self.rate != 1.0:
            items.append(f"rate={self.rate!r}")
        if self.hang:
            items.append("hang=1")
        if self.drop_after is not None:
            items.append(f"drop-after={self.drop_after}")
        if self.drop_after_done:
            items.append("drop-after-done=1")
        if self.ttft_ms is not None:
            items.append(f"ttft-ms={self.ttft_ms!r}")
        if self.itl_ms is not None:
            items.append(f"itl-ms={self.itl_ms!r}")
        if self.tokens is not None:
            items.append(f"tokens={self.tokens}")
        if self.retry_after is not None:
            items.append(f"retry-after={self.retry_after}")
        if self.error_after is not None:
            items.append(f"error-after={self.error_after}")
        return ",".join(items)


NO_FAULT = FaultSpec()


def _int(item: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise FaultSpecError(item, f"expected an integer from {low} to {high}") from None
    if not low <= number <= high:
        raise FaultSpecError(item, f"expected an integer from {low} to {high}")
    return number


def _float(item: str, value: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise FaultSpecError(item, "expected a number") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise FaultSpecError(item, f"expected a number from {low:g} to {high:g}")
    return number


def _bool(item: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise FaultSpecError(item, "expected 1 or 0")


_FIELDS = {
    "status": "status",
    "rate": "rate",
    "hang": "hang",
    "drop-after": "drop_after",
    "drop-after-done": "drop_after_done",
    "ttft-ms": "ttft_ms",
    "itl-ms": "itl_ms",
    "tokens": "tokens",
    "retry-after": "retry_after",
    "error-after": "error_after",
}


@functools.lru_cache(maxsize=256)
def parse_fault(text: str) -> FaultSpec:
    """Parse a spec (see the module docstring); raises FaultSpecError naming the bad item.

    Cached: per-request headers repeat, and the result is immutable.
    """
    values: dict[str, Any] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower().replace("_", "-")
        value = value.strip()
        if not sep:
            if key != "hang":
                raise FaultSpecError(item, "expected key=value")
            value = "1"
        field = _FIELDS.get(key)
        if field is None:
            known = ", ".join(_FIELDS)
            raise FaultSpecError(item, f"unknown key {key!r} (known: {known})")
        if field in values:
            raise FaultSpecError(item, f"{key} given twice")
        if key == "status":
            values[field] = _int(item, value, 400, 599)
        elif key == "rate":
            values[field] = _float(item, value, 0.0, 1.0)
        elif key in ("hang", "drop-after-done"):
            values[field] = _bool(item, value)
        elif key in ("drop-after", "retry-after", "error-after"):
            values[field] = _int(item, value, 0, 1_000_000)
        elif key == "tokens":
            values[field] = _int(item, value, 0, MAX_TOKENS)
        else:
            values[field] = _float(item, value, 0.0, 86_400_000.0)
    return FaultSpec(**values)
