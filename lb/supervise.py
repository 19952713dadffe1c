"""Keeps a background service running: a crash is logged with its traceback, counted, and the
service restarted after an exponential backoff. It never takes the server down."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

log = logging.getLogger("lb.supervise")


@attrs.define
class ServiceStats:
    crashes: int = 0
    last_error: str = ""


async def supervise(
    name: str,
    service: Callable[[], Awaitable[None]],
    stats: ServiceStats | None = None,
    *,
    first_backoff: float = 0.5,
    max_backoff: float = 30.0,
) -> None:
    """Run `service` forever; if it returns it is done, if it raises it is restarted."""
    stats = stats if stats is not None else ServiceStats()
    backoff = first_backoff
    while True:
        started = trio.current_time()
        try:
            await service()
            return
        except Exception as exc:
            stats.crashes += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("service %s crashed (%d so far); restarting in %.1fs",
                          name, stats.crashes, backoff)
        # A service that ran well for a while starts again from the shortest backoff.
        if trio.current_time() - started > max_backoff:
            backoff = first_backoff
        await trio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)
