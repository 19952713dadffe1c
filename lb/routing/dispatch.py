"""The request lifecycle: one deadline, a capacity slot, attempts with honest verdicts and
failover, and the answer streamed through untouched.

`Dispatcher.plan` is synchronous and cheap: it resolves the model and orders the eligible nodes.
`Dispatcher.execute` writes the answer to a `ResponseSink`, whose head goes out only with the
first byte: until then every failure can still go to another node or become a clean error
(raised as an `LBError`; the client's dialect renders it). After that, a failure is raised as
`UpstreamStreamError` / `DeadlineExceeded` with the sink committed, and the dialect ends the
stream with its error event.

Each attempt ends with one `Outcome`, and only `FAILURE` counts against the node: a client that
leaves or stops reading, lb's own limits, the request's deadline and a node's 429 say nothing
about the node's health.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson
import trio

from lb.cluster.node import Node
from lb.cluster.registry import Registry
from lb.config import Settings
from lb.errors import (
    AllUpstreamsFailed,
    AttemptFailure,
    CapacityExceeded,
    DeadlineExceeded,
    LBError,
    LocalResourcesExhausted,
    ModelNotFound,
    ModelUnavailable,
    NodeNotFound,
    NoHealthyNode,
    RateLimited,
    ShuttingDown,
    UpstreamStreamError,
)
from lb.http.sse import EventSplitter
from lb.http.types import ClientGone, Headers, ResponseSink
from lb.obs.latency import LatencyTracker
from lb.obs.observer import Observers, Outcome, RequestObserver, Trace
from lb.obs.usage import content_events, usage_of
from lb.routing import hedge, prefix, resume, split, strategies
from lb.routing.context import check_context, estimate_tokens
from lb.routing.eligibility import Reason, blocked
from lb.routing.intent import RouteRequest
from lb.routing.node_rate import estimate as estimate_prompt
from lb.routing.resolve import ModelKind, resolve_model
from lb.upstream.base import UpstreamResponse
from lb.upstream.client import (
    BodyTooLarge,
    ConnectError,
    LocalResourceError,
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
)
from lb.upstream.dialects.base import StreamFailed, StreamIncomplete, StreamTranslator
from lb.upstream.dialects.openai import PATHS

log = logging.getLogger("lb.dispatch")

MAX_UPSTREAM_BODY = 64 * 1024 * 1024
# How much of a node's error answer is read to quote its own words to the client.
MAX_ERROR_QUOTE = 200
CAPACITY_RETRY_AFTER = 1.0
# A node's Retry-After keeps it out of routing for at most this long (a misconfigured node
# must not take itself out for a day).
MAX_RETRY_AFTER = 300.0

# Headers that describe one hop, not the message (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"trailers",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
        b"host", b"content-length", b"expect",
    }
)
_DONE_TAIL = re.compile(rb"data: *\[DONE\]\s*$")
_SSE_HEAD = ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"))
_JSON_TYPE = (b"content-type", b"application/json")
_JSON_START = re.compile(rb"\s*[\[{]")


@attrs.frozen(slots=True)
class Plan:
    """What one proxied request will do."""

    path: str  # for OpenAI-compatible nodes, as are body and headers
    body: bytes
    model: str
    stream: bool
    kind: ModelKind
    fields: Mapping[str, Any]  # the client's body, parsed: what other dialects encode
    authorization: bytes | None  # the client's, for nodes that `forward_auth`
    candidates: tuple[Node, ...]  # in preference order
    deadline: float
    budget: float  # seconds from arrival to the deadline
    request_id: str
    headers: Headers  # to send to the node
    max_attempts: int
    # Candidates from fallback groups -> the model they are asked for instead of `model`.
    fallback: Mapping[str, str] = attrs.field(factory=dict)
    matched: str | None = None  # the name a wildcard group (`model`) matched


class Dispatcher:
    def __init__(
        self, registry: Registry, settings: Settings, rng: random.Random | None = None,
        observer: RequestObserver | None = None, latency: LatencyTracker | None = None,
    ):
        self.registry = registry
        self.settings = settings
        self.observer: RequestObserver = observer or Observers()
        self.strategy = strategies.parse_strategy(settings.routing_strategy)
        # What a request may choose for itself (ROUTING_STRATEGY always).
        self.allowed = frozenset(
            strategies.parse_strategy(name) for name in settings.allowed_strategies
        ) | {self.strategy}
        # Figures for the strategies that need them: the tracker must be among the observers.
        self.latency = latency or LatencyTracker()
        self.sentinels = settings.sentinels
        self.aliases = settings.aliases
        self.fallbacks = settings.fallbacks
        self.catalogue = settings.catalogue
        self.wildcards = settings.catalogue is not None and any(
            "*" in handle for handle in settings.catalogue.handles
        )
        self._counter = itertools.count()
        self._rng = rng or random.Random()
        # PREFIX_AWARE: block hash -> the node that served it (empty unless that strategy runs).
        self.prefixes = prefix.PrefixIndex(settings.prefix_aware_index_size)
        # HEDGE_AFTER_MS: None when off (the request path then tests this one attribute).
        self.hedger = None if settings.hedge_after_ms is None else hedge.Hedger(
            settings.hedge_after_ms, settings.hedge_max
        )

    def plan(self, intent: RouteRequest, trace: Trace | None = None) -> Plan:
        """Resolve the model and order the nodes that may take the request (no I/O); the
        resolved model goes into `trace` even when no node can take it."""
        model, matched = self._model_for(intent)
        estimate = None
        catalogue = self.catalogue
        if catalogue is not None and model in catalogue.limited:  # a known context window
            estimate = estimate_tokens(intent.body, intent.kind)
            model = check_context(catalogue, model, estimate)
        if trace is not None:
            trace.model = model
        raw = intent.raw if model == intent.model else orjson.dumps({**intent.body, "model": model})
        budget = self.settings.request_timeout
        if intent.budget is not None:
            budget = min(budget, intent.budget)
        nodes = self.registry.serving(model)
        if estimate is not None:  # only the deployments the prompt fits
            nodes = [node for node in nodes if _fits(node, estimate)]
        if intent.node:
            nodes = [node for node in nodes if node.key == intent.node]
            if not nodes:
                raise NodeNotFound(f"Node {intent.node} does not serve model {model} (or is down)")
        now = trio.current_time()
        open_nodes = [node for node in nodes if blocked(node, now) is None]
        strategy = intent.strategy or self.strategy
        fallback: dict[str, str] = {}
        extra: list[Node] = []
        if self.fallbacks and not intent.node and self._fallback_groups(model):
            extra, fallback = self._fallbacks(model, strategy, now, open_nodes)
        queue_timeout = self.settings.queue_timeout
        if queue_timeout and len(open_nodes) < len(nodes):
            # Nodes kept only by their rpm/tpm, if one frees within the queue: waited for
            # after the open ones (a request may queue for either).
            extra = [*_rate_waiters(nodes, now, queue_timeout), *extra]
        if not open_nodes:
            if not extra:
                raise _nobody_serves(model, nodes, now)
            return self._plan(intent, model, raw, budget, extra, fallback, matched)
        latency = prices = hint = None
        chain: tuple[bytes, ...] = ()
        # Figures, prices and prefixes only for the strategies that read them (the default does
        # not).
        if strategy is not strategies.Strategy.LEAST_LOADED and not intent.session:
            if strategy in strategies.NEEDS_LATENCY:
                latency = self.latency.figures(node.key for node in open_nodes)
            elif strategy is strategies.Strategy.COST_OPTIMIZED:
                prices = node_prices(open_nodes)
            elif strategy is strategies.Strategy.PREFIX_AWARE:
                chain = prefix.blocks(intent.body, intent.kind, self.settings.prefix_aware_blocks)
                hint = self._prefix_hint(chain, open_nodes)
        weights = self.registry.prefs.traffic_split
        candidates = strategies.order(
            strategy, open_nodes, counter=next(self._counter), rng=self._rng,
            session=intent.session, latency=latency, prices=prices, prefix=hint,
            split=self.split_for(weights, open_nodes, intent.session) if weights else None,
        )
        if chain and hint is not None and hint.owner in (None, candidates[0].key):
            # The node that served a new prefix owns it; a spill (bounded load passed the owner
            # over) leaves the owner in place, so the prefix's cache is not scattered.
            self.prefixes.record(chain, candidates[0].key)
        return self._plan(intent, model, raw, budget, [*candidates, *extra], fallback, matched)

    def _plan(
        self, intent: RouteRequest, model: str, raw: bytes, budget: float,
        candidates: Sequence[Node], fallback: dict[str, str], matched: str | None,
    ) -> Plan:
        retries = 0 if intent.node else self.settings.max_retries
        return Plan(
            path=PATHS[intent.kind],
            body=raw,
            model=model,
            stream=intent.stream,
            kind=intent.kind,
            fields=intent.body,
            authorization=intent.authorization,
            candidates=tuple(candidates),
            deadline=intent.arrival + budget,
            budget=budget,
            request_id=intent.request_id,
            headers=intent.headers,
            # Each fallback group gets its own chance, whatever the retries spent before it.
            max_attempts=1 + retries + len(self._fallback_groups(model)),
            fallback=fallback,
            matched=matched,
        )

    def draw(self) -> tuple[int, random.Random]:
        """The next request counter and the RNG, for an explanation of a ranking now."""
        return next(self._counter), self._rng

    def split_for(
        self, weights: Mapping[str, float], nodes: Sequence[Node], session: str | None
    ) -> split.Split | None:
        """The blue/green split of this request over ``nodes`` (None when none carries the
        label): drawn from the RNG, or from the session so it keeps to one group."""
        label = self.settings.traffic_split_label
        groups = {node.key: node.config.labels[label] for node in nodes
                  if label in node.config.labels}
        if not groups:
            return None
        u = split.session_unit(session) if session else self._rng.random()
        return split.Split(groups, weights, u)

    def _model_for(self, intent: RouteRequest) -> tuple[str, str | None]:
        """The model (or catalogue group) to route to, and the name a wildcard group (`mlx-*`)
        matched, if that is how it was found."""
        requested = self.aliases.get(intent.model, intent.model) if self.aliases else intent.model
        counts = self.registry.model_counts()
        if self.wildcards:  # a route such as `mlx-*` is no model a sentinel may pick
            counts = {model: n for model, n in counts.items() if "*" not in model}
        try:
            model = resolve_model(
                requested, counts, kind=intent.kind,
                sentinels=self.sentinels, preferred=self.registry.prefs.preferred_models,
                prefer_small=intent.prefer_small,
            )
            return model, None
        except ModelNotFound:
            group = self.catalogue.group_for(requested) if self.catalogue else None
            if group is not None and "*" in group and self.registry.serving(group):
                return group, requested
            if not self._fallback_groups(requested):
                self._unavailable(intent, requested)
                raise
            return requested, None  # none of its nodes is up: its fallbacks may be

    def _fallback_groups(self, model: str) -> tuple[str, ...]:
        """`model`'s fallbacks; `*`: those of every model without its own."""
        fallbacks = self.fallbacks
        return fallbacks.get(model) or fallbacks.get("*", ()) if fallbacks else ()

    def _fallbacks(
        self, model: str, strategy: strategies.Strategy, now: float, primary: list[Node],
    ) -> tuple[list[Node], dict[str, str]]:
        """The nodes of `model`'s fallback groups, in order of the groups, each group ordered
        by the strategy, after the model's own nodes; and the model each of them serves."""
        taken = {node.key for node in primary}
        extra: list[Node] = []
        fallback: dict[str, str] = {}
        for group in self._fallback_groups(model):
            nodes = [
                node for node in self.registry.serving(group)
                if node.key not in taken and blocked(node, now) is None
            ]
            ordered = strategies.order(
                strategy, nodes, counter=next(self._counter), rng=self._rng, session=None,
                latency=None, prices=None, prefix=None,
            )
            for node in ordered:
                taken.add(node.key)
                fallback[node.key] = group
            extra += ordered
        return extra, fallback

    def _prefix_hint(
        self, chain: tuple[bytes, ...], nodes: list[Node]
    ) -> strategies.PrefixHint | None:
        if not chain:
            return None
        owner = self.prefixes.match(chain, {node.key for node in nodes})
        return strategies.PrefixHint(owner, chain[0], self.settings.prefix_aware_balance)

    def _unavailable(self, intent: RouteRequest, requested: str) -> None:
        """A model served until recently is 503 with Retry-After, not 404: its node is busy or
        restarting, and SDKs retry a 503 but take a 404 for "no such model"."""
        gone = self.registry.gone_models(trio.current_time(), self.settings.model_grace)
        sentinel = requested.lower() in self.sentinels
        if requested in gone or (sentinel and gone and not self.registry.model_counts()):
            raise ModelUnavailable(
                f"The model '{intent.model}' is unavailable right now: no healthy node serves "
                "it (busy or restarting); retry shortly",
                retry_after=max(1.0, self.settings.scan_interval),
            )

    async def execute(self, intent: RouteRequest, sink: ResponseSink, trace: Trace) -> None:
        """Answer `intent` through `sink` (see the module docstring for what is raised),
        noting in `trace` how it went."""
        plan = self.plan(intent, trace)
        sink.tag(b"x-selected-model", plan.model.encode())
        run = _Run(self, plan, sink, trace, self.observer)
        if self.settings.stream_resume and plan.stream:
            run.watch(intent)
        with trio.move_on_at(plan.deadline) as scope:
            sink.cancel_on_drain(scope)
            try:
                try:
                    await run.run()
                except UpstreamStreamError as exc:
                    if run.transcript is None:
                        raise
                    await run.resume(exc)
                return
            except _DeadlinePassed:
                pass
        if trio.current_time() < plan.deadline:
            raise ShuttingDown("lb is shutting down; the answer was cut at the end of the drain")
        raise DeadlineExceeded(
            f"Request deadline of {plan.budget:g}s passed after {run.count} attempt(s)"
        )


class _AttemptFailed(Exception):
    """This attempt failed before anything reached the client; another node may try."""

    def __init__(self, reason: str, *, retry_same: bool = False, busy_for: float = 0.0):
        super().__init__(reason)
        self.reason = reason
        self.retry_same = retry_same  # a reason to try this node again (it never got the request)
        self.busy_for = busy_for  # a 429's Retry-After, in seconds


class _DeadlinePassed(Exception):
    """The request's deadline passed during an attempt."""


@attrs.frozen(slots=True)
class _Answer:
    """A node's whole (non-stream) answer, to send once the node's slot is free again."""

    status: int
    headers: Headers
    body: bytes


class _Lost(Exception):
    """Hedging: another attempt's answer came first; this one ends without a verdict."""


@attrs.define(eq=False)
class _Race:
    """Attempts racing for one request's sink (HEDGE_AFTER_MS)."""

    racers: list[_Racer] = attrs.field(factory=list)
    owner: _Racer | None = None  # the attempt whose answer head came first
    won: bool = False  # the owner's answer went through (or is ready to send)
    answer: _Answer | None = None  # the owner's whole answer (non-stream)
    error: Exception | None = None  # what ends the request (raised once the race is over)
    running: int = 0
    settled: trio.Event = attrs.field(factory=trio.Event)  # an owner, or no attempt left


@attrs.define(eq=False)
class _Racer:
    race: _Race
    node: Node
    started: float
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def __attrs_post_init__(self) -> None:
        self.race.racers.append(self)


@attrs.define(eq=False)
class _RacerSink:
    """The sink as one racing attempt sees it: committed only once it owns it."""

    sink: ResponseSink
    racer: _Racer

    @property
    def committed(self) -> bool:
        return self.racer.race.owner is self.racer and self.sink.committed

    def head(self, status: int, headers: Headers) -> None:
        self.sink.head(status, headers)

    def tag(self, name: bytes, value: bytes) -> None:
        self.sink.tag(name, value)

    async def send(self, data: bytes) -> None:
        await self.sink.send(data)

    def cancel_on_drain(self, scope: trio.CancelScope) -> None:
        self.sink.cancel_on_drain(scope)


@attrs.define(slots=True, eq=False)
class _Run:
    """One request's attempts."""

    dispatcher: Dispatcher
    plan: Plan
    sink: ResponseSink
    trace: Trace
    observer: RequestObserver
    count: int = 0
    failures: list[AttemptFailure] = attrs.field(factory=list)
    failed: set[str] = attrs.field(factory=set)  # nodes charged a failure (once per request)
    retry_same: set[str] = attrs.field(factory=set)  # failed nodes that may be tried again
    busy_for: list[float] = attrs.field(factory=list)  # the 429s' Retry-After
    writing: bool = False  # a write to the client is under way: a cut here is the client's
    # The attempt under way: when it must be over (the request's deadline, or sooner by its
    # node's own `timeout`) and its node's idle timeout between stream chunks.
    attempt_end: float = math.inf
    idle: float = math.inf
    racer: _Racer | None = None  # hedging: this copy runs one attempt of a race
    # STREAM_RESUME: what the client got so far, the request to continue, the current rewriter.
    transcript: resume.StreamTranscript | None = None
    resume_body: dict[str, Any] | None = None
    rewriter: resume.Rewriter | None = None
    resumes: int = 0
    prompt_tokens: int = -1  # the estimate a node's tpm counts (computed for such a node only)

    async def run(self) -> None:
        tried: set[str] = set()
        registry = self.dispatcher.registry
        sink = self.sink
        while self.count < self.plan.max_attempts:
            node, token = await self._acquire(tried)
            self.count += 1
            tried.add(node.key)
            trace = self.trace
            trace.attempts, trace.node = self.count, node.key
            if self.count > 1:
                trace.failovers += 1
            sink.tag(b"x-attempts", str(self.count).encode())
            sink.tag(b"x-routed-node", node.key.encode())
            if self.dispatcher.hedger is not None and len(self.plan.candidates) > 1:
                race = await self._race(node, token, tried)  # releases the slots itself
                if race is None:
                    continue  # every attempt of the race failed: fail over as usual
                answer = race.answer
            else:
                try:
                    answer = await self._attempt(node)
                except _AttemptFailed as exc:
                    self._failed(node, exc)
                    continue
                finally:
                    registry.release(node, token)
            if answer is not None:  # written after the slot is freed: a slow client holds none
                sink.head(answer.status, answer.headers)
                self._first_byte()
                self.writing = True
                await sink.send(answer.body)
                self.writing = False
                trace.chunks = 1
                trace.last_byte = trace.first_byte
            return
        self._give_up()

    def _failed(self, node: Node, exc: _AttemptFailed) -> None:
        self.failures.append(AttemptFailure(node.key, exc.reason))
        if exc.retry_same:
            self.retry_same.add(node.key)
        else:
            self.retry_same.discard(node.key)
        if exc.busy_for:
            self.busy_for.append(exc.busy_for)

    async def _race(self, first: Node, token: object, tried: set[str]) -> _Race | None:
        """HEDGE_AFTER_MS: run the attempt on `first` (holding `token`) and, each hedge delay
        that passes with no answer head, a twin on an untried node with a free slot right now
        (a hedge never queues). The first head wins the sink, the others are cancelled at once
        (no verdict, slot released). The finished race, or None when every attempt failed
        (their failures noted: the caller fails over). Raises like `_attempt`."""
        hedger = self.dispatcher.hedger
        assert hedger is not None
        plan = self.plan
        race = _Race()
        delay = hedger.delay(plan.model, trio.current_time())
        async with trio.open_nursery() as nursery:
            race.running += 1  # counted now: `settled` must not fire before a racer starts
            nursery.start_soon(self._racer, race, first, token)
            hedges = 0
            while delay is not None and hedges < hedger.max_hedges:
                if self.count >= plan.max_attempts:
                    break
                with trio.move_on_after(delay):
                    await race.settled.wait()
                if race.settled.is_set():
                    break
                grabbed = self._free_slot(tried, plan.fallback.get(first.key))
                if grabbed is None:
                    break
                node, token = grabbed
                hedges += 1
                self.count += 1
                tried.add(node.key)
                self.trace.attempts = self.count
                self.trace.hedges += 1
                self.sink.tag(b"x-attempts", str(self.count).encode())
                race.running += 1
                nursery.start_soon(self._racer, race, node, token)
        if race.error is not None:  # raised here, not in an ExceptionGroup from the nursery
            raise race.error
        return race if race.won else None

    async def _racer(self, race: _Race, node: Node, token: object) -> None:
        racer = _Racer(race, node, trio.current_time())
        run = attrs.evolve(self, sink=_RacerSink(self.sink, racer), racer=racer)
        try:
            with racer.scope:
                try:
                    race.answer = await run._attempt(node)
                    race.won = True
                except _AttemptFailed as exc:
                    if race.owner is None or race.owner is racer:  # a loser's failure is moot
                        self._failed(node, exc)
                except _Lost:
                    pass
                except Exception as exc:  # the winner's stream broke, the client left, ...
                    if race.owner is not None and race.owner is not racer:
                        return  # a loser's end is none of the winner's business
                    if race.error is None:
                        race.error = exc
                    for other in race.racers:
                        other.scope.cancel()
        finally:
            self.dispatcher.registry.release(node, token)
            race.running -= 1
            if not race.running:
                race.settled.set()

    def _claim(self, racer: _Racer) -> None:
        """Hedging: this attempt has its answer's head. It takes the sink unless another
        attempt did first (then _Lost), and the others are cancelled."""
        race = racer.race
        if race.owner is racer:
            return
        if race.owner is not None:
            raise _Lost
        race.owner = racer
        race.settled.set()
        for other in race.racers:
            if other is not racer:
                other.scope.cancel()
        hedger = self.dispatcher.hedger
        if hedger is not None:
            now = trio.current_time()
            hedger.observe(self.plan.model, now, now - racer.started)
        self.trace.node = racer.node.key
        self.sink.tag(b"x-routed-node", racer.node.key.encode())

    def _free_slot(self, tried: set[str], group: str | None) -> tuple[Node, object] | None:
        """A slot on the best untried node that has one free right now (a hedge never waits)
        and serves what the hedged attempt asked for: the model, or the same fallback group
        (a twin is the same request, not a fallback)."""
        now = trio.current_time()
        fallback = self.plan.fallback
        for node in self.plan.candidates:
            if node.key in tried or blocked(node, now) is not None:
                continue
            if fallback and fallback.get(node.key) != group:
                continue
            rate = node.rate
            if rate is not None and rate.wait(now, self._prompt_tokens()) > 0:
                continue
            token = object()
            if self._take_slot(node, now, token):
                return node, token
        return None

    def _take_slot(self, node: Node, now: float, token: object) -> bool:
        """A capacity slot on `node` for `token` and its breaker's leave, its rpm/tpm window
        charged; False, holding nothing, when either refuses."""
        try:
            node.limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            return False
        if not node.breaker.acquire(now):
            node.limiter.release_on_behalf_of(token)
            return False
        if node.rate is not None:
            node.rate.take(now, self.plan.request_id, self._prompt_tokens())
        return True

    def watch(self, intent: RouteRequest) -> None:
        """Keep a transcript of the stream, if another node could continue it."""
        chat = intent.kind == "chat"
        if intent.kind != "embedding" and resume.request_resumable(intent.body, chat):
            self.transcript = resume.StreamTranscript(chat)
            self.resume_body = {**intent.body, "model": self.plan.model}

    async def resume(self, error: UpstreamStreamError) -> None:
        """STREAM_RESUME: continue a stream that broke after its head went out on another
        node, at most STREAM_RESUME_MAX times, inside the request's deadline; re-raises the
        latest stream error when it cannot (the client then gets the error event)."""
        transcript, body = self.transcript, self.resume_body
        assert transcript is not None and body is not None
        settings = self.dispatcher.settings
        registry = self.dispatcher.registry
        trace = self.trace
        plan = self.plan
        while True:
            if transcript.finish_reason is not None and not (
                transcript.choices or transcript.broken or transcript.done
            ):
                # The answer was whole; only its end marker (and usage) went missing.
                self.writing = True
                await self.sink.send(resume.DONE_EVENT)
                self.writing = False
                return
            if not transcript.resumable or self.resumes >= settings.stream_resume_max:
                raise error
            # Not a node that failed in this request, nor one that answers with another model
            # (a fallback), nor one whose dialect cannot continue an answer (Ollama's).
            skip = self.failed | {trace.node or ""} | {
                node.key for node in plan.candidates
                if node.dialect.name not in _CONTINUES or node.key in plan.fallback
            }
            try:
                node, token = await self._acquire(skip)
            except LBError:
                raise error from None
            self.resumes += 1
            self.count += 1
            trace.attempts, trace.node, trace.resumes = self.count, node.key, self.resumes
            mode = node.config.labels.get("resume_mode", settings.stream_resume_mode)
            if mode not in resume.MODES:
                mode = settings.stream_resume_mode
            if node.dialect.name == "anthropic":
                mode = resume.NATIVE
            follow = resume.continuation(body, transcript, mode, settings.stream_resume_prompt)
            self.plan = attrs.evolve(plan, body=orjson.dumps(follow), fields=follow)
            self.rewriter = resume.Rewriter(transcript)
            log.info(
                "request %s: resuming the stream on %s (%s, %d tokens carried)",
                plan.request_id, node.key, mode, transcript.content_events,
            )
            try:
                answer = await self._attempt(node)
            except UpstreamStreamError as exc:
                error = exc
                continue
            finally:
                registry.release(node, token)
                self.plan, self.rewriter = plan, None
            if answer is not None:  # a whole answer (a 4xx) is no continuation
                quote = _error_message(answer.body)
                error = UpstreamStreamError(
                    f"Node {node.key} refused to continue the stream: HTTP {answer.status}"
                    + (f": {quote}" if quote else "")
                )
                continue
            if trace.usage_estimated or trace.completion_tokens is None:
                trace.completion_tokens = transcript.content_events
                trace.usage_estimated = True
            return

    def _give_up(self) -> None:
        model = self.plan.model
        if not self.failures:
            raise _nobody_serves(model, self.plan.candidates, trio.current_time())
        if len(self.busy_for) == len(self.failures):  # every node asked said 429
            raise RateLimited(
                f"Every node serving {model} is rate limiting requests; retry later",
                retry_after=min(self.busy_for),
            )
        raise AllUpstreamsFailed(self.failures)

    async def _acquire(self, tried: set[str]) -> tuple[Node, object]:
        """A slot on the best node not tried yet (or on one that may be tried again), waiting
        for one up to QUEUE_TIMEOUT_SECS when all are full. Waiting is never a node's failure."""
        candidates = self.plan.candidates
        ordered = [node for node in candidates if node.key not in tried]
        if self.retry_same:
            ordered += [node for node in candidates if node.key in self.retry_same]
        if not ordered:
            self._give_up()
        registry = self.dispatcher.registry
        # `now` moves only after a wait: a request that found a slot at once never queued.
        now = queued_at = trio.current_time()
        queue_deadline = queued_at + self.dispatcher.settings.queue_timeout
        while True:
            token = object()
            any_open = False
            wake = math.inf  # seconds until a node at its own rpm/tpm may take the request
            for node in ordered:
                rate = node.rate
                reason = blocked(node, now)
                if reason is not None:
                    if rate is not None and reason is Reason.RATE_LIMITED and (
                        node.busy_until <= now
                    ):
                        wake = min(wake, rate.wait(now, self._prompt_tokens()))
                    continue
                if rate is not None:
                    wait = rate.wait(now, self._prompt_tokens())
                    if wait > 0:
                        wake = min(wake, wait)
                        continue
                any_open = True
                if self._take_slot(node, now, token):
                    if now > queued_at:
                        self._queued(now - queued_at)
                    return node, token
            if not any_open and now + wake > queue_deadline:
                self._give_up()
            waits_for = [node.key for node in ordered]  # counted: a fleet grows our share
            registry.add_waiting(waits_for, 1)
            try:
                # A window frees its slot at a known time, not with a released slot: wake then.
                with trio.move_on_at(min(queue_deadline, now + wake)):
                    await registry.slot_freed.park()
                    now = trio.current_time()
                    continue
            finally:
                registry.add_waiting(waits_for, -1)
            now = trio.current_time()
            if now < queue_deadline:
                continue
            self._queued(now - queued_at)
            if not any_open:
                raise _nobody_serves(self.plan.model, ordered, now)
            raise CapacityExceeded(
                f"Every node serving {self.plan.model} is at capacity; retry shortly",
                retry_after=CAPACITY_RETRY_AFTER,
            )

    def _prompt_tokens(self) -> int:
        if self.prompt_tokens < 0:
            self.prompt_tokens = estimate_prompt(self.plan.body)
        return self.prompt_tokens

    def _queued(self, seconds: float) -> None:
        self.trace.queue_wait += seconds
        self.observer.queued(self.trace, seconds)

    def _first_byte(self) -> None:
        trace = self.trace
        trace.first_byte = seconds = trio.current_time() - trace.arrival
        self.observer.first_byte(trace, seconds)

    async def _attempt(self, node: Node) -> _Answer | None:
        """Try `node`: its whole answer to send (non-stream), or None once a stream was
        forwarded. Raises _AttemptFailed (try elsewhere), _DeadlinePassed, ClientGone, or an
        LBError with the sink committed (the stream broke)."""
        settings = self.dispatcher.settings
        plan = self.plan
        outcome = Outcome.NO_VERDICT
        reason = ""
        status: int | None = None
        started = trio.current_time()
        if self.trace.sent_to_node is None:  # lb's own overhead, arrival to the first attempt
            self.trace.sent_to_node = started - self.trace.arrival
        config = node.config
        end = plan.deadline
        if config.timeout is not None:  # a catalogue deployment's own timeout
            end = min(end, started + config.timeout)
        self.attempt_end = end
        self.idle = config.stream_timeout or settings.stream_idle_timeout
        scope = trio.CancelScope(deadline=min(end, started + settings.attempt_timeout))

        def sent() -> None:
            # A non-stream answer's head comes only after the whole generation: from here on
            # only the request's deadline (or the node's own timeout) bounds it.
            scope.deadline = end

        if node.rewrites or plan.fallback or plan.matched is not None:
            path, body, headers = self._for_node(node)
        else:
            path, body, headers = plan.path, plan.body, plan.headers
        try:
            with scope:
                try:
                    async with node.upstream.request(
                        "POST", path, headers, body,
                        on_sent=None if plan.stream else sent,
                    ) as up:
                        status = up.status
                        outcome, reason, answer = await self._handle(node, up, scope)
                        if outcome is Outcome.SUCCESS:
                            return answer
                        if self.sink.committed:
                            raise UpstreamStreamError(f"Node {node.key} {reason}")
                        busy_for = 0.0
                        if outcome is Outcome.BUSY:  # not asked again before its Retry-After
                            busy_for = _retry_after(up.headers)
                            node.busy_until = max(node.busy_until, trio.current_time() + busy_for)
                        raise _AttemptFailed(reason, busy_for=busy_for)
                except LocalResourceError as exc:
                    log.error("request %s: lb cannot open a connection: %s", plan.request_id, exc)
                    raise LocalResourcesExhausted(
                        "lb is out of file descriptors or memory; retry shortly",
                        retry_after=CAPACITY_RETRY_AFTER,
                    ) from None
                except UpstreamError as exc:
                    outcome, reason = Outcome.FAILURE, _describe(exc, self.sink.committed)
                    log.debug("request %s: %s: %r", plan.request_id, node.key, exc)
                    if self.sink.committed:
                        raise UpstreamStreamError(f"Node {node.key} {reason}") from None
                    raise _AttemptFailed(
                        reason, retry_same=isinstance(exc, ConnectError)
                    ) from None
            # The attempt's scope ran out (the request's deadline is the outer scope's).
            if trio.current_time() >= plan.deadline:
                raise _DeadlinePassed
            if self.writing:  # the client left a write blocked: not the node's doing
                raise ClientGone("the client stopped reading")
            outcome = Outcome.FAILURE
            if trio.current_time() >= end:
                reason = f"no answer within its timeout of {config.timeout:g}s"
            elif self.sink.committed:
                reason = f"stream went idle (nothing for {self.idle:g}s)"
            else:
                reason = f"no response within {settings.attempt_timeout:g}s"
            if self.sink.committed:
                raise UpstreamStreamError(f"Node {node.key} {reason}")
            raise _AttemptFailed(reason)
        finally:
            self._record(node, outcome, reason)
            self.observer.attempt_finished(
                self.trace, node.key, outcome, status, trio.current_time() - started
            )

    def _for_node(self, node: Node) -> tuple[str, bytes, Headers]:
        """The request as `node` takes it: its dialect, its name for the model, lb's
        credential (or the client's, when the node is configured to forward it)."""
        plan = self.plan
        config = node.config
        dialect = node.dialect
        asked = plan.fallback.get(node.key, plan.model)
        model = config.model_map.get(asked, asked)
        if plan.matched is not None and "*" in model:  # `mlx-*` -> the part `*` matched
            head, _, tail = asked.partition("*")
            model = model.replace("*", plan.matched[len(head): len(plan.matched) - len(tail)], 1)
        if dialect.passthrough and model == plan.model and not config.params:
            body = plan.body
        else:
            fields = {**config.params, **plan.fields} if config.params else plan.fields
            body = dialect.encode(plan.kind, fields, model)
        headers = plan.headers + node.auth_headers
        if config.forward_auth and not node.auth_headers and plan.authorization is not None:
            headers.append((b"authorization", plan.authorization))
        return dialect.path(plan.kind, plan.stream), body, headers

    async def _handle(
        self, node: Node, up: UpstreamResponse, scope: trio.CancelScope
    ) -> tuple[Outcome, str, _Answer | None]:
        """Judge and read the node's answer: (outcome, reason, a whole answer to send)."""
        status = up.status
        if status >= 500 or 300 <= status < 400:  # a redirect is no answer from an API either
            return Outcome.FAILURE, await _quote(up), None
        if status == 429:
            return Outcome.BUSY, await _quote(up), None
        if status in (401, 403) and node.auth_headers:
            # The node refused lb's own credential: lb's configuration, not the client's
            # request, is wrong; the node cannot serve anyone until it is fixed.
            return Outcome.FAILURE, f"refused lb's credential ({await _quote(up)})", None
        if self.racer is not None:  # hedging: the first answer wins the sink
            self._claim(self.racer)
        if not node.dialect.passthrough:
            return await self._translated(node, up, scope)
        headers = _from_node(up.headers, self.trace)
        if status == 200 and _is_event_stream(up.headers):
            if not self.sink.committed:  # a resumed stream goes on under the first head
                self.sink.head(status, headers)
            self.trace.status = status
            outcome, reason = await self._pump(up, scope)
            return outcome, reason, None
        if scope.deadline != self.attempt_end:  # mostly done by sent() already; a set costs
            scope.deadline = self.attempt_end
        body = await up.read(MAX_UPSTREAM_BODY)
        if 200 <= status < 300 and _JSON_START.match(body) is None:
            return Outcome.FAILURE, f"HTTP {status} with a body that is not JSON", None
        headers.append((b"content-length", str(len(body)).encode()))
        self.trace.status = status
        usage = usage_of(body)
        if usage is not None:
            self.trace.prompt_tokens, self.trace.completion_tokens = usage
        return Outcome.SUCCESS, "", _Answer(status, headers, body)

    async def _pump(self, up: UpstreamResponse, scope: trio.CancelScope) -> tuple[Outcome, str]:
        """Forward SSE bytes as they arrive, whole events at a time. Only the reads from the
        node are timed against the idle timeout; a write to a slow client is the sink's."""
        idle = self.idle
        # Moving a deadline costs; let it lag by up to a tenth of the idle timeout, so a quiet
        # stream is cut after 0.9 to 1.0 times STREAM_IDLE_TIMEOUT_SECS, never later.
        lag = idle - idle / 10
        deadline = self.attempt_end
        receive = up.receive_some
        send = self.sink.send
        splitter = EventSplitter()
        transcript, rewriter = self.transcript, self.rewriter
        last = b""
        trace = self.trace
        usage: tuple[int, int] | None = None
        events = 0
        scope.deadline = min(deadline, trio.current_time() + idle)  # replaces the attempt's
        try:
            while True:
                now = trio.current_time()
                if scope.deadline < deadline and scope.deadline - now < lag:
                    scope.deadline = min(deadline, now + idle)
                data = await receive()
                if not data:
                    break
                data = splitter.feed(data)
                if rewriter is not None and data:
                    data = rewriter.feed(data)
                if data:
                    if trace.first_byte is None:
                        self._first_byte()
                    self.writing = True
                    await send(data)
                    self.writing = False
                    if transcript is not None and rewriter is None:
                        transcript.feed(data)
                    last = data
                    trace.chunks += 1
                    if b'"usage"' in data:
                        usage = usage_of(data) or usage
                    elif usage is None:
                        events += content_events(data)
        except UpstreamError:
            if _DONE_TAIL.search(last[-32:]) is not None:
                return Outcome.SUCCESS, ""  # it said [DONE], then dropped the connection
            await self._end_event(ragged=not splitter.at_boundary)
            raise
        trace.last_byte = trio.current_time() - trace.arrival
        if usage is not None:
            trace.prompt_tokens, trace.completion_tokens = usage
        elif events:  # the node sent no usage: count the events that carried text
            trace.completion_tokens, trace.usage_estimated = events, True
        ragged = not splitter.at_boundary  # an oversized line let part of an event through
        rest = splitter.flush()
        close_delimited = _close_delimited(up.headers)
        if rest and (not close_delimited or b"[DONE]" in rest):
            # The node ended its message itself, inside an event: those bytes are its own.
            if rewriter is not None:
                rest = rewriter.feed(rest)
            elif transcript is not None:
                transcript.feed(rest)
            self.writing = True
            await send(rest)
            self.writing = False
            last, ragged = rest, True
        if close_delimited and _DONE_TAIL.search(last[-32:]) is None:
            # Without framing, the end of the connection is the end of the body: a node that
            # died mid-stream looks like one that finished, except for the missing [DONE]. Its
            # half event, if any, is dropped: the error event must not be glued onto it.
            await self._end_event(ragged)
            return Outcome.FAILURE, "closed the stream before [DONE]"
        return Outcome.SUCCESS, ""

    async def _translated(
        self, node: Node, up: UpstreamResponse, scope: trio.CancelScope
    ) -> tuple[Outcome, str, _Answer | None]:
        """A node of another dialect: its answer, or its stream, in OpenAI's words."""
        dialect, plan, trace, status = node.dialect, self.plan, self.trace, up.status
        kept = [item for item in _from_node(up.headers, trace) if item[0] != b"content-type"]
        if plan.stream and dialect.is_stream(status, up.headers):
            if not self.sink.committed:  # a resumed stream goes on under the first head
                self.sink.head(status, [*_SSE_HEAD, *kept])
            trace.status = status
            translator = dialect.translator(plan.kind, plan.model, plan.fields)
            outcome, reason = await self._pump_translated(translator, up, scope)
            return outcome, reason, None
        if scope.deadline != self.attempt_end:  # as in _handle
            scope.deadline = self.attempt_end
        body = await up.read(MAX_UPSTREAM_BODY)
        try:
            body = dialect.decode(plan.kind, status, body, plan.model)
        except ValueError:
            reason = f"HTTP {status} with an answer that is not {dialect.name}'s"
            return Outcome.FAILURE, reason, None
        kept += [_JSON_TYPE, (b"content-length", str(len(body)).encode())]
        trace.status = status
        usage = usage_of(body)
        if usage is not None:
            trace.prompt_tokens, trace.completion_tokens = usage
        return Outcome.SUCCESS, "", _Answer(status, kept, body)

    async def _pump_translated(
        self, translator: StreamTranslator, up: UpstreamResponse, scope: trio.CancelScope
    ) -> tuple[Outcome, str]:
        """`_pump` for a translated stream: the translator frames the events, and says
        whether the node finished its answer."""
        idle = self.idle
        deadline = self.attempt_end
        trace = self.trace
        send = self.sink.send
        transcript, rewriter = self.transcript, self.rewriter
        try:
            while True:
                scope.deadline = min(deadline, trio.current_time() + idle)
                received = await up.receive_some()
                data = translator.feed(received) if received else translator.finish()
                done = data.endswith(b"data: [DONE]\n\n")
                if rewriter is not None and data:  # a resumed stream: more of the first one
                    data = rewriter.feed(data)
                if data:
                    if trace.first_byte is None:
                        self._first_byte()
                    self.writing = True
                    await send(data)
                    self.writing = False
                    trace.chunks += 1
                    if transcript is not None and rewriter is None:
                        transcript.feed(data)
                if not received or done:
                    break
        except (StreamIncomplete, StreamFailed) as exc:
            return Outcome.FAILURE, str(exc) or "closed the stream before it was done"
        trace.last_byte = trio.current_time() - trace.arrival
        usage = translator.usage
        if usage is not None and rewriter is not None:
            usage = rewriter.whole(*usage)
        if usage is not None:
            trace.prompt_tokens, trace.completion_tokens = usage
        return Outcome.SUCCESS, ""

    async def _end_event(self, ragged: bool) -> None:
        """Before an error event: end the half event an oversized line let through."""
        if self.sink.committed and ragged:
            self.writing = True
            await self.sink.send(b"\n\n")
            self.writing = False

    def _record(self, node: Node, outcome: Outcome, reason: str) -> None:
        now = trio.current_time()
        breaker = node.breaker
        if outcome is Outcome.SUCCESS:
            node.last_answer = now
            if breaker.open_until() is not None:
                log.warning("breaker of %s closed: request %s succeeded", node.key,
                            self.plan.request_id)
            breaker.record_success(now)
        elif outcome is Outcome.FAILURE and node.key not in self.failed:
            self.failed.add(node.key)  # one bad request is not an outage: once per node
            node.last_error = reason
            log.warning(
                "request %s: attempt %d on %s failed: %s",
                self.plan.request_id, self.count, node.key, reason,
            )
            was_open = breaker.open_until()
            breaker.record_failure(now)
            until = breaker.open_until()
            if until is not None and until != was_open:  # it just opened: tell the fleet
                log.warning("breaker of %s opened for %gs", node.key, breaker.ttl)
                self.dispatcher.registry.breaker_opened(node, until)
        else:
            breaker.release_probe()


# The dialects whose nodes can continue another node's answer (STREAM_RESUME): OpenAI-compatible
# servers by `continue_final_message`, or an instruction; Anthropic by its native prefill.
_CONTINUES = frozenset({"openai", "anthropic"})


def _fits(node: Node, estimate: int) -> bool:
    limit = node.config.max_input_tokens
    return limit is None or estimate <= limit


def node_prices(nodes: Sequence[Node]) -> dict[str, float]:
    """Price per token of the nodes that have one (labels `price`, or `price_in`+`price_out`)."""
    prices = {}
    for node in nodes:
        price = strategies.price_of(node.config.labels)
        if price is not None:
            prices[node.key] = price
    return prices


def _nobody_serves(model: str, nodes: Sequence[Node], now: float) -> LBError:
    """Why no node can take a request now: the nodes' own rate limits (429, until the first
    Retry-After runs out), else no healthy node (503)."""
    busy = [node.busy_until - now for node in nodes if node.busy_until > now]
    busy += [wait for node in nodes if node.rate is not None and (wait := node.rate.wait(now))]
    if busy:
        return RateLimited(
            f"Every node serving {model} is rate limiting requests; retry later",
            retry_after=min(busy),
        )
    return NoHealthyNode(f"No healthy node serves model {model} right now")


def _rate_waiters(nodes: Sequence[Node], now: float, queue_timeout: float) -> list[Node]:
    """Nodes kept only by their own rpm/tpm, that may take a request within `queue_timeout`."""
    return [
        node for node in nodes
        if node.rate is not None and blocked(node, now) is Reason.RATE_LIMITED
        and node.busy_until <= now and node.rate.wait(now) <= queue_timeout
    ]


def _from_node(headers: Headers, trace: Trace) -> Headers:
    """The node's end-to-end headers; its own request id is kept as x-upstream-request-id (the
    client gets exactly one x-request-id: its own, or lb's)."""
    kept = []
    for item in headers:
        name = item[0]
        if name in HOP_BY_HOP:
            continue
        if name == b"x-request-id":
            trace.upstream_request_id = item[1].decode("latin-1")
            item = (b"x-upstream-request-id", item[1])
        kept.append(item)
    return kept


def _retry_after(headers: Headers) -> float:
    """A 429's Retry-After in seconds (lb's own second when it sent none, or a date)."""
    for key, value in headers:
        if key == b"retry-after":
            try:
                seconds = float(value)
            except ValueError:
                break
            if math.isfinite(seconds):
                return min(max(1.0, seconds), MAX_RETRY_AFTER)
    return CAPACITY_RETRY_AFTER


def _is_event_stream(headers: Headers) -> bool:
    for key, value in headers:
        if key == b"content-type":
            return value.startswith(b"text/event-stream")
    return False


def _close_delimited(headers: Headers) -> bool:
    """A body that ends when the connection does (no length, not chunked)."""
    return not any(key in (b"content-length", b"transfer-encoding") for key, _ in headers)


async def _quote(up: UpstreamResponse) -> str:
    """`HTTP <status>` and the node's own error message, shortened (what a user needs to see
    to fix their request, e.g. "unknown role 'foo'")."""
    what = f"HTTP {up.status}"
    try:
        data = await up.receive_some()
    except UpstreamError:
        return what
    message = _error_message(data)
    return f"{what}: {message}" if message else what


def _error_message(data: bytes) -> str:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        text = data.decode("utf-8", "replace")
    else:
        found = body
        if isinstance(found, dict):
            found = found.get("error", found)
        if isinstance(found, dict):
            found = found.get("message") or found.get("detail") or ""
        text = found if isinstance(found, str) else ""
    text = " ".join(text.split())  # no control characters or line breaks reach the client
    if len(text) > MAX_ERROR_QUOTE:
        text = text[: MAX_ERROR_QUOTE - 1] + "…"
    return text


def _describe(exc: UpstreamError, mid_stream: bool) -> str:
    """What went wrong, for a client: no parser internals, no addresses beyond host:port."""
    if isinstance(exc, ConnectError):
        return "cannot connect"
    if isinstance(exc, UpstreamClosed):
        return "closed the connection mid-stream" if mid_stream else (
            "closed the connection before answering"
        )
    if isinstance(exc, UpstreamProtocolError):
        return "sent an invalid HTTP response"
    if isinstance(exc, BodyTooLarge):
        return f"sent an answer larger than {MAX_UPSTREAM_BODY // (1024 * 1024)} MiB"
    return "failed"


__all__ = ["HOP_BY_HOP", "PATHS", "Dispatcher", "Outcome", "Plan", "Trace"]
