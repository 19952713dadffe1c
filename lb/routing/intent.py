"""`RouteRequest`: what a client wants, free of HTTP. The client's dialect (`lb.api`) builds it;
routing reads nothing else — no headers, no query string."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from lb.http.types import Headers
from lb.routing.resolve import ModelKind
from lb.routing.strategies import Strategy


@attrs.frozen(slots=True)
class RouteRequest:
    model: str  # as the client asked: an id, an alias or a sentinel such as "auto"
    kind: ModelKind
    stream: bool
    body: Mapping[str, Any]  # the parsed JSON body; never mutated
    raw: bytes  # the body as received: sent on untouched when the model needs no rewrite
    request_id: str
    arrival: float  # trio clock
    budget: float | None = None  # seconds from arrival the client allows (None: lb's default)
    session: str | None = None  # sticky-session key
    node: str | None = None  # a forced node, host:port (no failover)
    prefer_small: bool = False
    strategy: Strategy | None = None  # the client's choice (None: ROUTING_STRATEGY)
    headers: Headers = attrs.field(factory=list)  # end-to-end headers to send to the node
    # The client's Authorization header: never sent on, except to a node configured to
    # receive it (`forward_auth`).
    authorization: bytes | None = attrs.field(default=None, repr=False)
