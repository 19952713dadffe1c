"""A node's live state in this process: models, health, capacity, breaker, upstream."""

from __future__ import annotations

import math

import attrs
import trio

from lb.cluster.breaker import CircuitBreaker
from lb.config import NodeConfig, Settings
from lb.http.types import Headers
from lb.routing.node_rate import NodeRate
from lb.upstream.base import Upstream
from lb.upstream.client import ConnectionPool
from lb.upstream.dialects import Dialect, dialect_for
from lb.upstream.dialects.openai import OPENAI


def _limiter_size(capacity: int) -> float:
    return capacity if capacity > 0 else math.inf


@attrs.define(eq=False)
class Node:
    config: NodeConfig
    limiter: trio.CapacityLimiter
    breaker: CircuitBreaker
    upstream: Upstream  # how requests reach the node (the h11 pool, or a fake in tests)
    models: tuple[str, ...] = ()
    healthy: bool = False
    last_error: str = ""
    discovered: bool = False  # found by the scanner, not configured
    draining: bool = False  # reserved: a draining node takes no new requests
    probe_failures: int = 0  # failed probes in a row
    api: str = ""  # what answered the last good probe: "openai" (/v1/models) or "ollama"
    maxconn: int = 0  # the configured fleet-wide cap (0 = none); the limiter holds our share
    busy_until: float = 0.0  # it answered 429 with Retry-After: not asked again before this
    last_answer: float = -math.inf  # when it last answered a request well (passive health)
    dialect: Dialect = OPENAI
    # lb's credential for the node, sent with every request (empty for most local nodes).
    auth_headers: Headers = attrs.field(factory=list)
    # A request needs more than the client's bytes and headers: a translated dialect, the
    # node's own model names or a credential. False on the fast path.
    rewrites: bool = False
    # The deployment's rpm/tpm windows; None (one attribute test) for a node without limits.
    rate: NodeRate | None = None

    @classmethod
    def create(
        cls, config: NodeConfig, *, capacity: int, breaker_threshold: int, breaker_ttl: float,
        upstream: Upstream | None = None, dialect: Dialect = OPENAI,
    ) -> Node:
        node = cls(
            config=config,
            limiter=trio.CapacityLimiter(_limiter_size(capacity)),
            breaker=CircuitBreaker(threshold=breaker_threshold, ttl=breaker_ttl),
            upstream=upstream or ConnectionPool(config.url),
            maxconn=capacity,
            dialect=dialect,
            auth_headers=dialect.auth(config.api_key) if config.api_key else [],
        )
        node.rewrites = (
            not dialect.passthrough or bool(config.model_map) or bool(node.auth_headers)
            or config.forward_auth or bool(config.params)
        )
        if config.rpm is not None or config.tpm is not None:
            node.rate = NodeRate(config.rpm, config.tpm)
        if config.models:  # a fixed list: serving from the start, never probed
            node.models, node.healthy = config.models, True
        return node

    @classmethod
    def from_settings(cls, config: NodeConfig, settings: Settings) -> Node:
        """A node with the cap (MAXCONN_MAP / DEFAULT_MAXCONN) and breaker the settings give."""
        return cls.create(
            config,
            capacity=settings.maxconn_for(config),
            breaker_threshold=settings.breaker_threshold,
            breaker_ttl=settings.breaker_ttl,
            dialect=dialect_for(
                config.dialect, default_max_tokens=settings.anthropic_max_tokens,
                drop_params=settings.drop_params,
            ),
        )

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def weight(self) -> float:
        return self.config.weight

    @property
    def inflight(self) -> int:
        return self.limiter.borrowed_tokens

    @property
    def capacity(self) -> int:
        """This instance's concurrency cap for the node (its share of the fleet's); 0: none."""
        total = self.limiter.total_tokens
        return 0 if total == math.inf else int(total)

    @capacity.setter
    def capacity(self, value: int) -> None:
        self.limiter.total_tokens = _limiter_size(value)

    def is_full(self) -> bool:
        return self.limiter.available_tokens < 1

    def describe(self, now: float, maxconn: int | None = None) -> dict[str, object]:
        """The node as `/v1/nodes` shows it; `maxconn`: the cap in force (an admin override)."""
        return {
            "node": self.key,
            "url": self.url,
            "models": list(self.models),
            "healthy": self.healthy,
            "inflight": self.inflight,
            "maxconn": self.maxconn if maxconn is None else maxconn,
            "local_maxconn": self.capacity,
            "weight": self.weight,
            "labels": dict(self.config.labels),
            "consecutive_failures": self.breaker.consecutive_failures,
            "breaker": self.breaker.state(now).name.lower(),
            "last_error": self.last_error,
            "discovered": self.discovered,
            "draining": self.draining,
            "probe_failures": self.probe_failures,
            "api": self.api,
            "dialect": self.dialect.name,
        }
