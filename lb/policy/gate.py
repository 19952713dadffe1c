"""The policy gate: which key a request carries, whether it may go (401/403/402/429), and what
it cost once it ended.

Both dialects' edges call it before routing: `identify(request)` (the key, from
`Authorization: Bearer` or, on the Anthropic edge, `x-api-key`), then `admit(record, model,
estimate)`, which returns an `Admission` to put on the request's `Trace`. The gate is also a
`RequestObserver`: when the request finishes it settles the admission — the real tokens replace
the estimate in the key's TPM window, the parallel slot frees, and usage x price is added to the
key's spend. Only built when a master key or the operator's rate limits (`LB_RATE_LIMITS`) are
set: without either the request path never sees it.

Key records are cached in memory; a background task flushes spend to the store every
`SPEND_FLUSH_SECS` and polls the store's version counter every `VERSION_POLL_SECS`, so a key
revoked on any instance stops working everywhere within a second.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from lb.errors import Forbidden, LBError, PaymentRequired, RateLimitExceeded, Unauthorized
from lb.obs.observer import Observer, Trace
from lb.policy import keys
from lb.policy.counters import KeyCounters, Limits, Refusal, Ticket
from lb.policy.keys import KeyRecord
from lb.policy.prices import Prices, cost
from lb.policy.store import SpendRecord

if TYPE_CHECKING:
    from lb.http.types import Request
    from lb.policy.fleet import FleetLimits

log = logging.getLogger("lb.policy")

SPEND_FLUSH_SECS = 1.0  # spend reaches the store this often (lost on kill -9: at most this)
VERSION_POLL_SECS = 0.5  # a key changed elsewhere is seen within this (+ one store call)
_CACHE_MAX = 10_000  # cached lookups, unknown keys included; cleared when full
_BYTES_PER_TOKEN = 4  # the prompt estimate admitted up front: request bytes / 4
_UNKNOWN = KeyRecord("")  # not in the cache (None there means: no such key)


class KeyStore(Protocol):
    """Where keys and spend live: SQLite (`store.SqliteStore`) or the fleet's Redis."""

    async def get(self, token: str) -> KeyRecord | None: ...
    async def find_alias(self, alias: str) -> KeyRecord | None: ...
    async def list_keys(self) -> list[KeyRecord]: ...
    async def put(self, record: KeyRecord) -> None: ...
    async def delete(self, tokens: Sequence[str]) -> list[str]: ...
    async def version(self) -> int: ...
    async def add_spend(self, records: Sequence[SpendRecord]) -> None: ...
    async def spend_logs(self, token: str | None = None, limit: int = 100
                         ) -> list[dict[str, Any]]: ...
    async def spend_daily(self, token: str | None = None) -> list[dict[str, Any]]: ...


def estimate_tokens(body: bytes) -> int:
    """The prompt tokens admitted before the real usage is known."""
    return len(body) // _BYTES_PER_TOKEN + 1


def presented_key(request: Request, header: bytes = b"authorization") -> str | None:
    """The key a request carries, as text (see `presented_bytes`)."""
    key = presented_bytes(request, header)
    return None if key is None else key.decode("latin-1")


def presented_bytes(request: Request, header: bytes = b"authorization") -> bytes | None:
    """The key a request carries: `Authorization: Bearer <key>`, or the raw value of `header`
    (the Anthropic edge's `x-api-key`), which wins when both are given."""
    if header != b"authorization":
        raw = request.header(header)
        if raw and raw.strip():
            return raw.strip()
    raw = request.header(b"authorization")
    if not raw or raw[:7].lower() != b"bearer ":
        return None
    return raw[7:].strip() or None


@attrs.define(slots=True, eq=False)
class Admission:
    """A request's hold on its key's limits, from admission until `settle`."""

    gate: Gate
    record: KeyRecord | None  # None: the master key (no limits, no spend)
    ticket: Ticket | None = None
    # (Immutable defaults, not factories: one Admission is made per request.)
    headers: Sequence[tuple[bytes, bytes]] = ()  # x-ratelimit-*
    limits: Limits | None = None  # the limits it was admitted under (a share, Redis down)
    fleet: bool = False  # admitted by the fleet's Redis
    done: bool = False
    # Operator limits (per model, all requests) it holds: their counters and its tickets;
    # or, admitted by the fleet's Redis, their groups there and its tickets.
    scoped: Sequence[tuple[KeyCounters, Ticket]] = ()
    fleet_scoped: Sequence[tuple[str, Ticket]] = ()

    def settle(self, trace: Trace) -> None:
        if not self.done:
            self.done = True
            self.gate.settle(self, trace)


class Gate(Observer):
    def __init__(
        self, master_key: str, store: KeyStore, prices: Prices, *,
        fleet: FleetLimits | None = None, wall: Callable[[], float] = time.time,
        rate_limits: Mapping[str, Limits] | None = None,
    ) -> None:
        self._master = master_key.encode()
        self.keys_on = bool(master_key)  # else only the operator's rate limits apply
        # The operator's limits: per model, and '*' for every request. In a fleet with Redis
        # up they are counted there, exact fleet-wide, in the same script call as the key's;
        # else on this instance's counters (Redis down: its share, limit / live instances).
        self.rate_limits = dict(rate_limits or {})
        self._scoped: dict[str, KeyCounters] = {}
        self.store = store
        self.prices = prices
        self.fleet = fleet
        self.wall = wall
        self._records: dict[str, KeyRecord | None] = {}
        # The last record read of each key, for when the store cannot be reached (Redis down).
        self._known: dict[str, KeyRecord | None] = {}
        self._version: int | None = None
        self._counters: dict[str, KeyCounters] = {}
        self._pending: dict[str, float] = {}  # spend not yet flushed, per key
        self._queue: list[SpendRecord] = []

    # --- identify and admit ---

    def is_master(self, key: str | bytes) -> bool:
        given = key if isinstance(key, bytes) else key.encode()
        return hmac.compare_digest(given, self._master)

    async def identify(
        self, request: Request, header: bytes = b"authorization"
    ) -> KeyRecord | None:
        """The request's key record (None for the master key); 401 for none, unknown, expired."""
        if not self.keys_on:
            return None
        key = presented_bytes(request, header)
        if key is None:
            raise Unauthorized(
                "Missing API key: send 'Authorization: Bearer <key>'"
                + (" or 'x-api-key: <key>'" if header == b"x-api-key" else "")
            )
        if hmac.compare_digest(key, self._master):
            return None
        token = hashlib.sha256(key).hexdigest()  # as keys.hash_key does for a key
        record = self._records.get(token, _UNKNOWN)
        if record is _UNKNOWN:
            record = await self.lookup(token)
        if record is None:
            raise Unauthorized("Invalid API key")
        if record.expires is not None and record.expired(self.wall()):
            raise Unauthorized("API key expired", code="expired_key")
        return record

    async def lookup(self, token: str) -> KeyRecord | None:
        try:
            return self._records[token]
        except KeyError:
            pass
        try:
            record = await self.store.get(token)
        except Exception as exc:  # the store is down: what we knew, or 503 (never 500)
            if token in self._known:
                return self._known[token]
            log.warning("key store unavailable: %s", exc)
            raise LBError("The key store is unavailable; try again", status=503,
                          code="key_store_unavailable", retry_after=1) from None
        if len(self._records) >= _CACHE_MAX:
            self._records.clear()
        if len(self._known) >= _CACHE_MAX:
            self._known.clear()
        self._records[token] = self._known[token] = record
        return record

    async def admit(self, record: KeyRecord | None, model: str, estimate: int) -> Admission:
        """403 for a model the key may not use, 402 once its budget is spent, 429 over a limit
        (the key's, or the operator's for the model or for every request); else the admission
        (with the key's x-ratelimit-* headers for the answer)."""
        scopes = self._scopes(model) if self.rate_limits else None
        if record is None:  # the master key, or keys off
            if not scopes:
                return Admission(self, None)
            if self.fleet is not None and self.fleet.up:
                fleet_admission = await self._admit_fleet(None, None, model, estimate)
                if fleet_admission is not None:
                    return fleet_admission
            admission = Admission(self, None)
            admission.scoped = self._take_scopes(scopes, estimate)
            return admission
        if not record.allows(model):
            raise Forbidden(
                f"This key may not use model {model!r}; it may use: {', '.join(record.models)}",
                code="model_not_allowed", param="model",
            )
        if record.max_budget is not None and self.spent(record) >= record.max_budget:
            raise PaymentRequired(
                f"Budget exhausted: spent ${self.spent(record):.6f} of ${record.max_budget:g}"
                + (f" this {record.budget_duration} period" if record.budget_duration else ""),
            )
        limits = record.limits
        if self.fleet is not None and self.fleet.up and (scopes or limits.any):
            fleet_admission = await self._admit_fleet(
                record, limits if limits.any else None, model, estimate
            )
            if fleet_admission is not None:
                return fleet_admission
        if not limits.any:  # (also when Redis went down just now: then our shares)
            admission = Admission(self, record)
        else:
            if self.fleet is not None:
                limits = limits.share(self.fleet.instances)
            if scopes:  # the operator's first: a refusal there takes nothing from the key
                self._check_scopes(scopes, estimate)
            admission = self._local(record, limits, estimate)
        if scopes:  # they fit (checked above, nothing awaited since): count them
            admission.scoped = self._take_scopes(scopes, estimate)
        return admission

    async def _admit_fleet(
        self, record: KeyRecord | None, limits: Limits | None, model: str, estimate: int
    ) -> Admission | None:
        """The operator's limits for `model` and the key's `limits` (None: none) in one
        script call on the fleet's Redis, all or nothing; None when Redis cannot be asked."""
        fleet = self.fleet
        assert fleet is not None
        groups: list[tuple[str, Limits]] = []
        labels: list[str] = []
        for name, label in (("*", "all requests"), (model, f"model {model}")):
            scope = self.rate_limits.get(name)
            if scope is not None:
                groups.append((fleet.scope_group(name), scope))
                labels.append(label)
        scoped = len(groups)
        if record is not None and limits is not None:
            groups.append((fleet.key_group(record.token), limits))
            labels.append("this key")
        result = await fleet.admit(groups, estimate)
        if result is None:
            return None
        if isinstance(result, tuple):
            index, refusal = result
            raise _refused(labels[index], refusal, groups[index][1])
        if scoped < len(groups):
            ticket = result[-1]
            admission = Admission(self, record, ticket, ticket.figures.headers(), limits, True)
        else:
            admission = Admission(self, record)
        admission.fleet_scoped = [(groups[i][0], result[i]) for i in range(scoped)]
        return admission

    def _local(self, record: KeyRecord, limits: Limits, estimate: int) -> Admission:
        counters = self._counters.get(record.token)
        if counters is None:
            counters = self._counters[record.token] = KeyCounters()
        now = trio.current_time()
        if counters.limits is not limits:
            counters.configure(limits, now)
        return self._admitted(record, counters.admit(now, estimate), limits, fleet=False)

    def _admitted(
        self, record: KeyRecord, result: Ticket | Refusal, limits: Limits, *, fleet: bool
    ) -> Admission:
        if isinstance(result, Refusal):
            raise _refused("this key", result, limits)
        return Admission(self, record, result, result.figures.headers(), limits, fleet)

    def _scopes(self, model: str) -> list[tuple[str, KeyCounters]]:
        """The operator's counters that apply to a request for `model`."""
        scopes = []
        for name, label in (("*", "all requests"), (model, f"model {model}")):
            limits = self.rate_limits.get(name)
            if limits is None:
                continue
            if self.fleet is not None:
                limits = limits.share(self.fleet.instances)
            counters = self._scoped.get(name)
            if counters is None:
                counters = self._scoped[name] = KeyCounters()
            counters.configure(limits, trio.current_time())
            scopes.append((label, counters))
        return scopes

    def _check_scopes(self, scopes: list[tuple[str, KeyCounters]], estimate: int) -> None:
        now = trio.current_time()
        for label, counters in scopes:
            refusal = counters.check(now, estimate)
            if refusal is not None:
                raise _refused(label, refusal, counters.limits)

    def _take_scopes(
        self, scopes: list[tuple[str, KeyCounters]], estimate: int
    ) -> list[tuple[KeyCounters, Ticket]]:
        self._check_scopes(scopes, estimate)  # all of them fit: then each is counted
        now = trio.current_time()
        return [(counters, counters.take(now, estimate)) for _, counters in scopes]

    def spent(self, record: KeyRecord) -> float:
        """The key's spend in its current budget period (flushed + not yet flushed)."""
        _, new_period = keys.current_period(record, self.wall())
        return (0.0 if new_period else record.spend) + self._pending.get(record.token, 0.0)

    # --- settle (an observer: the request finished) ---

    def finished(self, trace: Trace) -> None:
        admission = trace.admission
        if admission is not None and not admission.done:  # Admission.settle, one call less
            admission.done = True
            self.settle(admission, trace)

    def settle(self, admission: Admission, trace: Trace | None) -> None:
        record, ticket = admission.record, admission.ticket
        prompt = trace.prompt_tokens if trace is not None else None
        completion = trace.completion_tokens if trace is not None else None
        used = None if prompt is None and completion is None else (prompt or 0) + (completion or 0)
        if admission.scoped:
            now = trio.current_time()
            for scoped, held in admission.scoped:
                scoped.settle(held, used, now)
        if admission.fleet_scoped and self.fleet is not None:
            for group, held in admission.fleet_scoped:
                self.fleet.settle(group, held, used)
        if record is None:
            return
        if ticket is not None:
            if admission.fleet and self.fleet is not None:
                self.fleet.settle(self.fleet.key_group(record.token), ticket, used)
            else:
                mine = self._counters.get(record.token)
                if mine is not None:
                    mine.settle(ticket, used, trio.current_time())
        if used is None or trace is None:
            return
        model, node = trace.model or trace.requested_model, trace.node or ""
        spend = cost(self.prices(model, node), prompt or 0, completion or 0)
        self._pending[record.token] = self._pending.get(record.token, 0.0) + spend
        self._queue.append(SpendRecord(
            record.token, trace.request_id, model, node, prompt or 0, completion or 0, spend,
            self.wall(),
        ))

    # --- background: flush spend, notice changed keys ---

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.fleet is not None:
                nursery.start_soon(self.fleet.run)
            await self._maintain()

    async def _maintain(self) -> None:
        flush_at = trio.current_time() + SPEND_FLUSH_SECS
        failing = False
        while True:
            await trio.sleep(VERSION_POLL_SECS)
            try:
                if trio.current_time() >= flush_at:
                    await self.flush()  # kept and tried again if the store is down
                    flush_at = trio.current_time() + SPEND_FLUSH_SECS
                    # Reloaded at next use: the spend other instances added (a shared store).
                    self._records.clear()
                await self.refresh()
            except Exception as exc:  # the store is away (Redis down): go on with the cache
                if not failing:
                    log.warning("key store unavailable, serving from the cache: %s", exc)
                failing = True
            else:
                if failing:
                    log.info("key store reachable again")
                failing = False

    async def flush(self) -> None:
        """Write the spend of finished requests to the store (one transaction)."""
        if not self._queue:
            return
        batch, self._queue = self._queue, []
        try:
            await self.store.add_spend(batch)
        except BaseException:
            self._queue[:0] = batch  # tried again at the next flush
            raise
        flushed: dict[str, float] = {}
        for rec in batch:
            flushed[rec.token] = flushed.get(rec.token, 0.0) + rec.spend
        for token, amount in flushed.items():
            left = self._pending.get(token, 0.0) - amount
            if left > 1e-12:
                self._pending[token] = left
            else:
                self._pending.pop(token, None)
        self._records.clear()  # reloaded with the store's spend (and any change of period)

    async def refresh(self) -> None:
        version = await self.store.version()
        if version != self._version:
            self._version = version
            self._records.clear()
            self._known.clear()

    def forget(self) -> None:
        """A key changed here: drop cached lookups now (other instances poll the version)."""
        self._records.clear()
        self._known.clear()

    # --- the admin API's operations ---

    async def create(self, body: dict[str, Any]) -> tuple[str, KeyRecord]:
        key = body.get("key")
        if key is not None and (not isinstance(key, str) or len(key) < 8):
            raise ValueError("'key' must be text of at least 8 characters")
        key = key or keys.new_key()
        if self.is_master(key):
            raise ValueError("'key' may not be the master key")
        record = keys.make(body, key, self.wall())
        if await self.store.get(record.token) is not None:
            raise ValueError("that key exists already")
        await self._alias_free(record)
        await self.store.put(record)
        self.forget()
        return key, record

    async def update(self, token: str, body: dict[str, Any]) -> KeyRecord | None:
        record = await self.store.get(token)
        if record is None:
            return None
        changed = keys.update(record, body, self.wall())
        await self._alias_free(changed)
        await self.store.put(changed)
        self.forget()
        return changed

    async def _alias_free(self, record: KeyRecord) -> None:
        if record.key_alias:
            other = await self.store.find_alias(record.key_alias)
            if other is not None and other.token != record.token:
                raise ValueError(f"key_alias {record.key_alias!r} is taken")

    async def delete(self, tokens: Sequence[str]) -> list[str]:
        gone = await self.store.delete(tokens)
        self.forget()
        for token in gone:
            self._counters.pop(token, None)
        return gone

    async def info(self, token: str) -> KeyRecord | None:
        record = await self.store.get(token)
        if record is None:
            return None
        return attrs.evolve(record, spend=self.spent(record))

    async def resolve(self, key_or_alias: str) -> str:
        """A key, its token or its alias -> its token (the token of nothing if unknown)."""
        token = keys.hash_key(key_or_alias)
        if await self.store.get(token) is None:
            other = await self.store.find_alias(key_or_alias)
            if other is not None:
                return other.token
        return token


def _refused(whose: str, refusal: Refusal, limits: Limits) -> RateLimitExceeded:
    per = {"requests": ("requests per minute", limits.rpm),
           "tokens": ("tokens per minute", limits.tpm),
           "parallel": ("parallel requests", limits.parallel)}[refusal.limit]
    return RateLimitExceeded(
        f"Rate limit exceeded for {whose}: {per[1]} {per[0]}; "
        f"retry after {math.ceil(refusal.retry_after)}s",
        retry_after=refusal.retry_after, headers=tuple(refusal.figures.headers()),
    )
