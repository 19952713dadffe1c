"""The request lifecycle: one deadline, a capacity slot, attempts with honest failover, and the
answer streamed through untouched.

`Dispatcher.plan` is synchronous and cheap: it resolves the model and orders the eligible nodes
(errors here are ordinary HTTP errors). `Dispatcher.execute` is the response writer: the server
sends the response head only at its first `send`, so until the first byte reaches the client
every failure can still go to another node or become a clean error status. After that, a
failure becomes one `data: {"error": …}` event and `data: [DONE]`.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import uuid
from collections.abc import Sequence

import attrs
import orjson
import trio

from lb.cluster.node import Node
from lb.cluster.registry import Registry
from lb.config import Settings
from lb.http.errors import HTTPError, error_payload
from lb.http.sse import error_event
from lb.http.types import Headers, Request, Response, SendBody
from lb.routing import strategies
from lb.routing.resolve import ModelKind, ModelNotFound, resolve_model
from lb.upstream.client import UpstreamError, UpstreamResponse

log = logging.getLogger("lb.dispatch")

MAX_UPSTREAM_BODY = 64 * 1024 * 1024
# An SSE event split across reads is held back until complete (so an error event can never be
# glued onto half an event); a "line" longer than this is passed on as it is.
MAX_PARTIAL_EVENT = 1024 * 1024
RETRY_AFTER_SECS = b"1"

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those lb sets itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"trailers",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
        b"host", b"content-length", b"expect",
    }
)
# lb parsed the body as JSON and says so itself; compressed answers could not be spliced.
_NOT_TO_NODE = _HOP_BY_HOP | {b"accept-encoding", b"content-type"}
_JSON = (b"content-type", b"application/json")


@attrs.define(slots=True)
class Plan:
    """What one proxied request will do."""

    path: str
    body: bytes
    model: str
    stream: bool
    candidates: list[Node]  # in preference order
    deadline: float
    budget: float  # seconds from arrival to the deadline
    request_id: str
    headers: Headers  # to send to the node
    max_attempts: int


class Dispatcher:
    def __init__(self, registry: Registry, settings: Settings, rng: random.Random | None = None):
        self.registry = registry
        self.settings = settings
        self.strategy = strategies.parse_strategy(settings.routing_strategy)
        self.sentinels = settings.sentinels
        self._counter = itertools.count()
        self._rng = rng or random.Random()
        # Request ids: a random prefix per process and a counter (no syscall per request).
        self._id_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)

    def _new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):08x}"

    # --- planning (no I/O) ---

    def resolve(self, requested: str, kind: ModelKind, prefer_small: bool = False) -> str:
        try:
            return resolve_model(
                requested, self.registry.model_counts(), kind=kind, sentinels=self.sentinels,
                preferred=self.registry.prefs.preferred_models, prefer_small=prefer_small,
            )
        except ModelNotFound as exc:
            raise HTTPError(404, str(exc), code="model_not_found", param="model") from None

    def order(self, nodes: Sequence[Node], session: str | None) -> list[Node]:
        if len(nodes) <= 1:
            return list(nodes)
        if session:
            return strategies.rendezvous(nodes, session)
        if self.strategy is strategies.Strategy.ROUND_ROBIN:
            return strategies.round_robin(nodes, next(self._counter))
        if self.strategy is strategies.Strategy.RANDOM:
            return strategies.random_order(nodes, self._rng)
        return strategies.least_loaded(nodes, next(self._counter))

    def plan(
        self, request: Request, *, path: str, kind: ModelKind, body: dict[str, object],
        raw: bytes, stream: bool,
    ) -> Plan:
        arrival = trio.current_time()
        requested = body["model"]
        assert isinstance(requested, str)
        model = self.resolve(requested, kind, request.header(b"x-prefer-small") in (b"1", b"true"))
        if model != requested:
            body["model"] = model
            raw = orjson.dumps(body)
        budget = self._budget(request)
        nodes = self.registry.serving(model)
        forced = request.query_params().get("node") if request.query else None
        if forced:
            nodes = [node for node in nodes if node.key == forced]
            if not nodes:
                raise HTTPError(
                    404, f"Node {forced} does not serve model {model} (or is down)",
                    code="node_not_found", param="node",
                )
        now = trio.current_time()
        open_nodes = [node for node in nodes if node.breaker.allows(now)]
        if not open_nodes:
            raise HTTPError(
                503, f"No healthy node serves model {model} right now", code="no_healthy_node"
            )
        session = request.header(b"x-session-id")
        request_id = request.header(b"x-request-id")
        return Plan(
            path=path,
            body=raw,
            model=model,
            stream=stream,
            candidates=self.order(open_nodes, session.decode("latin-1") if session else None),
            deadline=arrival + budget,
            budget=budget,
            request_id=request_id.decode("latin-1") if request_id else self._new_request_id(),
            headers=[_JSON, *(item for item in request.headers if item[0] not in _NOT_TO_NODE)],
            max_attempts=1 if forced else 1 + self.settings.max_retries,
        )

    def _budget(self, request: Request) -> float:
        budget = self.settings.request_timeout
        header = request.header(b"x-request-budget-ms")
        if header is not None:
            try:
                millis = float(header)
            except ValueError:
                millis = math.nan
            if not math.isfinite(millis) or millis < 0:
                raise HTTPError(
                    400, "x-request-budget-ms must be a number of milliseconds >= 0",
                    code="invalid_header", param="x-request-budget-ms",
                )
            budget = min(budget, millis / 1000)
        return budget

    # --- execution (the response writer) ---

    async def execute(self, plan: Plan, response: Response, send: SendBody) -> None:
        attempt = _Attempts(self, plan, response, send)
        try:
            with trio.move_on_at(plan.deadline):
                await attempt.run()
                return
        except _DeadlineExceeded:
            pass
        message = f"Request deadline of {plan.budget:g}s passed after {attempt.count} attempt(s)"
        if attempt.started:
            await send(error_event(error_payload(message, status=504, code="deadline_exceeded")))
            return
        raise HTTPError(504, message, code="deadline_exceeded", headers=attempt.meta_headers())


class _NodeFailed(Exception):
    """This attempt failed before anything reached the client; another node may try."""


class _DeadlineExceeded(Exception):
    """The request's deadline passed during an attempt."""


@attrs.define(slots=True)
class _Attempts:
    dispatcher: Dispatcher
    plan: Plan
    response: Response
    send: SendBody
    count: int = 0
    started: bool = False
    node: Node | None = None
    failures: list[str] = attrs.field(factory=list)

    def meta_headers(self) -> Headers:
        headers = [
            (b"x-selected-model", self.plan.model.encode()),
            (b"x-request-id", self.plan.request_id.encode("latin-1")),
            (b"x-attempts", str(self.count).encode()),
        ]
        if self.node is not None:
            headers.append((b"x-routed-node", self.node.key.encode()))
        return headers

    async def run(self) -> None:
        tried: set[str] = set()
        while self.count < self.plan.max_attempts:
            node, token = await self._acquire(tried)
            self.count += 1
            self.node = node
            tried.add(node.key)
            try:
                await self._try(node)
                return
            except _NodeFailed as exc:
                self.failures.append(f"{node.key}: {exc}")
            finally:
                self.dispatcher.registry.release(node, token)
        listing = "; ".join(self.failures)
        raise HTTPError(
            502, f"All {self.count} attempt(s) failed: {listing}",
            code="all_upstreams_failed", headers=self.meta_headers(),
        )

    async def _acquire(self, tried: set[str]) -> tuple[Node, object]:
        """A slot on the best node not tried yet (or tried, if none is left), waiting for one
        up to QUEUE_TIMEOUT_SECS when all are full. Waiting is never a node's failure."""
        settings = self.dispatcher.settings
        candidates = self.plan.candidates
        fresh = [node for node in candidates if node.key not in tried]
        ordered = fresh + [node for node in candidates if node.key in tried] if tried else fresh
        queue_deadline = trio.current_time() + settings.queue_timeout
        while True:
            now = trio.current_time()
            token = object()
            any_allowed = False
            for node in ordered:
                if not node.healthy or not node.breaker.allows(now):
                    continue
                any_allowed = True
                try:
                    node.limiter.acquire_on_behalf_of_nowait(token)
                except trio.WouldBlock:
                    continue
                if node.breaker.acquire(now):
                    return node, token
                node.limiter.release_on_behalf_of(token)
            if not any_allowed:
                if self.failures:
                    raise HTTPError(
                        502, f"All {self.count} attempt(s) failed: {'; '.join(self.failures)}",
                        code="all_upstreams_failed", headers=self.meta_headers(),
                    )
                raise HTTPError(
                    503, f"No healthy node serves model {self.plan.model} right now",
                    code="no_healthy_node", headers=self.meta_headers(),
                )
            with trio.move_on_at(queue_deadline):
                await self.dispatcher.registry.slot_freed.park()
                continue
            raise HTTPError(
                429,
                f"Every node serving {self.plan.model} is at capacity; retry shortly",
                code="capacity_exceeded",
                headers=[(b"retry-after", RETRY_AFTER_SECS), *self.meta_headers()],
            )

    async def _try(self, node: Node) -> None:
        settings = self.dispatcher.settings
        plan = self.plan
        node.requests += 1
        verdict: bool | None = None
        try:
            with trio.move_on_at(
                min(plan.deadline, trio.current_time() + settings.attempt_timeout)
            ) as scope:
                async with node.pool.request("POST", plan.path, plan.headers, plan.body) as up:
                    if up.status >= 500:
                        verdict = False
                        raise _NodeFailed(f"HTTP {up.status}")
                    if up.status == 429:  # busy, not broken: try elsewhere, breaker untouched
                        raise _NodeFailed("HTTP 429")
                    verdict = True  # a 4xx is the request's fault, not the node's
                    headers = [*_end_to_end(up.headers), *self.meta_headers()]
                    is_sse = any(
                        k == b"content-type" and v.startswith(b"text/event-stream")
                        for k, v in up.headers
                    )
                    if not is_sse:
                        scope.deadline = plan.deadline
                        body = await up.read(MAX_UPSTREAM_BODY)
                        self.response.status = up.status
                        self.response.headers = [
                            *headers, (b"content-length", str(len(body)).encode())
                        ]
                        self.started = True
                        await self.send(body)
                        return
                    self.response.status = up.status
                    self.response.headers = headers
                    await self._pump(up, scope)
            if scope.cancelled_caught:
                if trio.current_time() >= plan.deadline:
                    raise _DeadlineExceeded
                verdict = False
                what = "stream went idle" if self.started else "no response in time"
                if self.started:
                    await self.send(_stream_error(f"Node {node.key}: {what}"))
                    return
                raise _NodeFailed(what)
        except UpstreamError as exc:
            verdict = False
            if self.started:
                await self.send(_stream_error(f"Node {node.key} failed mid-stream: {exc}"))
                return
            raise _NodeFailed(str(exc) or type(exc).__name__) from None
        finally:
            self._record(node, verdict)

    async def _pump(self, up: UpstreamResponse, scope: trio.CancelScope) -> None:
        """Forward SSE bytes as they arrive, whole events at a time."""
        idle = self.dispatcher.settings.stream_idle_timeout
        # Moving a deadline costs; let it lag by up to a tenth of the idle timeout, so a quiet
        # stream is cut after 0.9 to 1.0 times STREAM_IDLE_TIMEOUT_SECS, never later.
        lag = idle - idle / 10
        deadline = self.plan.deadline
        receive = up.receive_some
        pending = b""
        scope.deadline = min(deadline, trio.current_time() + idle)  # replaces the attempt's
        while True:
            now = trio.current_time()
            if scope.deadline < deadline and scope.deadline - now < lag:
                scope.deadline = min(deadline, now + idle)
            data = await receive()
            if not data:
                if pending:
                    await self._forward(pending)
                return
            if pending:
                data = pending + data
                pending = b""
            cut = data.rfind(b"\n\n") + 2
            if cut < len(data) and len(data) < MAX_PARTIAL_EVENT:
                data, pending = data[:cut], data[cut:]
            if data:
                await self._forward(data)

    async def _forward(self, data: bytes) -> None:
        self.started = True
        await self.send(data)

    def _record(self, node: Node, verdict: bool | None) -> None:
        now = trio.current_time()
        if verdict is None:
            node.breaker.release_probe()
        elif verdict:
            node.breaker.record_success(now)
        else:
            node.failures += 1
            was_open = node.breaker.open_until()
            node.breaker.record_failure(now)
            until = node.breaker.open_until()
            if until is not None and until != was_open:  # it just opened: tell the fleet
                self.dispatcher.registry.breaker_opened(node, until)


def _end_to_end(headers: Headers) -> Headers:
    return [(k, v) for k, v in headers if k not in _HOP_BY_HOP]


def _stream_error(message: str) -> bytes:
    return error_event(error_payload(message, status=502, code="upstream_stream_error"))
