"""Keys, spend and limits shared by a fleet, in Redis: exact fleet-wide.

`FleetLimits.admit` is one Lua script per admitted request: it makes the decision of
`counters.KeyCounters` (sliding 60 s windows for requests and tokens, the burst bucket, parallel
requests) on the fleet's shared state, atomically, on Redis's clock — so two instances can
never together admit more than a limit, nor refuse what fits. One call holds every group of
limits a request must fit — its key's and the operator's (`LB_RATE_LIMITS`, per model and for
all requests) — all or nothing: a refusal by one takes nothing from the others. Settling (the
real tokens, the parallel slots) is batched: one script call for every request that ended
meanwhile.

When Redis cannot be reached the gate falls back to this instance's counters with the limits
divided by the live instances (`Limits.share`), reports it in `/health`, and tries Redis again
after `RETRY_SECS`. `RedisKeyStore` is the gate's `KeyStore` for a fleet.

redis-py is synchronous: every call runs in a worker thread (`trio.to_thread`), as in
`lb/cluster/redis_store.py`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
import orjson
import redis
import trio

from lb.policy.counters import Figures, Limits, Refusal, Ticket
from lb.policy.keys import KeyRecord, current_period
from lb.policy.store import SpendRecord, _day

T = TypeVar("T")
log = logging.getLogger("lb.policy")

RETRY_SECS = 1.0  # after a failed call, requests use local limits this long before retrying
PARALLEL_GRACE_SECS = 60.0  # a slot never released (its instance died) expires this long
#                             after the request's deadline

# One admission against one or more groups of limits (a key's; the operator's per model and
# for all requests), all or nothing: every group is checked, then each is counted only if all
# fit — a refusal by any takes nothing from the others.
# KEYS, 6 per group: requests zset, token zset, token weights hash, token total, burst hash,
#   parallel zset
# ARGV: id, estimate, parallel ttl ms, then per group: rpm, tpm, burst, parallel (0: no such
#   limit)
# -> refused: {0, the refusing group (the first, 1-based), wait requests ms, wait tokens ms,
#              wait parallel ms, requests left, requests reset ms, tokens left, tokens reset ms}
#    admitted: {1, 0, then per group: requests left, requests reset ms, tokens left,
#               tokens reset ms}
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, est, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local horizon = now - 60000
local groups = {}
for g = 1, #KEYS / 6 do
  local k, a = (g - 1) * 6, 3 + (g - 1) * 4
  local rpm, tpm = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local burst, par = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local wreq, wtok, wpar = 0, 0, 0
  local refuse = false
  local nreq, reset_req = 0, 0
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 1], '-inf', horizon)
    nreq = redis.call('ZCARD', KEYS[k + 1])
    if nreq > 0 then
      reset_req = tonumber(redis.call('ZRANGE', KEYS[k + 1], 0, 0, 'WITHSCORES')[2])
        + 60000 - now
    end
    if nreq + 1 > rpm then
      local at = redis.call('ZRANGE', KEYS[k + 1], nreq - rpm, nreq - rpm, 'WITHSCORES')
      wreq = tonumber(at[2]) + 60000 - now
      refuse = true
    end
  end
  local level = burst
  if burst > 0 and rpm > 0 then
    local b = redis.call('HMGET', KEYS[k + 5], 'level', 'last')
    if b[1] then
      level = math.min(burst, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * rpm / 60000)
    end
    if level < 1 then
      wreq = math.max(wreq, (1 - level) * 60000 / rpm)
      refuse = true
    end
  end
  local total, reset_tok = 0, 0
  if tpm > 0 then
    local old = redis.call('ZRANGEBYSCORE', KEYS[k + 2], '-inf', horizon)
    for _, member in ipairs(old) do
      total = total - tonumber(redis.call('HGET', KEYS[k + 3], member) or '0')
      redis.call('HDEL', KEYS[k + 3], member)
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 2], '-inf', horizon)
    if #old > 0 then redis.call('INCRBY', KEYS[k + 4], total) end
    total = tonumber(redis.call('GET', KEYS[k + 4]) or '0')
    if redis.call('ZCARD', KEYS[k + 2]) == 0 then
      total = 0
      redis.call('DEL', KEYS[k + 4])
    else
      reset_tok = tonumber(redis.call('ZRANGE', KEYS[k + 2], 0, 0, 'WITHSCORES')[2])
        + 60000 - now
    end
    if total + est > tpm then
      refuse = true
      if est > tpm then
        wtok = 60000
      else
        local excess = total + est - tpm
        local entries = redis.call('ZRANGE', KEYS[k + 2], 0, -1, 'WITHSCORES')
        wtok = 60000
        for i = 1, #entries, 2 do
          excess = excess - tonumber(redis.call('HGET', KEYS[k + 3], entries[i]) or '0')
          if excess <= 0 then
            wtok = tonumber(entries[i + 1]) + 60000 - now
            break
          end
        end
      end
    end
  end
  if par > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 6], '-inf', now)
    if redis.call('ZCARD', KEYS[k + 6]) >= par then
      wpar = 1000
      refuse = true
    end
  end
  if refuse then
    return {0, g, wreq, wtok, wpar, rpm - nreq, reset_req, tpm - total, reset_tok}
  end
  groups[g] = {rpm, tpm, burst, par, nreq, reset_req, level, total, reset_tok}
end
local out = {1, 0}
for g, s in ipairs(groups) do
  local k = (g - 1) * 6
  local rpm, tpm, burst, par, nreq, reset_req, level, total, reset_tok = unpack(s)
  if rpm > 0 then
    redis.call('ZADD', KEYS[k + 1], now, id)
    redis.call('PEXPIRE', KEYS[k + 1], 61000)
    nreq = nreq + 1
    if reset_req == 0 then reset_req = 60000 end
  end
  if burst > 0 and rpm > 0 then
    redis.call('HSET', KEYS[k + 5], 'level', tostring(level - 1), 'last', now)
    redis.call('PEXPIRE', KEYS[k + 5], math.ceil(burst * 60000 / rpm) + 1000)
  end
  if tpm > 0 then
    redis.call('ZADD', KEYS[k + 2], now, id)
    redis.call('HSET', KEYS[k + 3], id, est)
    redis.call('INCRBY', KEYS[k + 4], est)
    for i = 2, 4 do redis.call('PEXPIRE', KEYS[k + i], 61000) end
    total = total + est
    if reset_tok == 0 then reset_tok = 60000 end
  end
  if par > 0 then
    redis.call('ZADD', KEYS[k + 6], now + ttl, id)
    redis.call('PEXPIRE', KEYS[k + 6], ttl)
  end
  out[#out + 1] = rpm - nreq
  out[#out + 1] = reset_req
  out[#out + 1] = tpm - total
  out[#out + 1] = reset_tok
end
return out
"""

# ARGV: prefix, then groups of: a group's name (see `key_group`, `scope_group`), id, real
#   tokens (-1: unknown), held a parallel slot
_SETTLE = """
for i = 2, #ARGV, 4 do
  local base = ARGV[1] .. ARGV[i]
  local id = ARGV[i + 1]
  local used = tonumber(ARGV[i + 2])
  if used >= 0 then
    local old = redis.call('HGET', base .. 'tokw', id)
    if old then
      redis.call('HSET', base .. 'tokw', id, used)
      redis.call('INCRBY', base .. 'tokt', used - tonumber(old))
    end
  end
  if ARGV[i + 3] == '1' then redis.call('ZREM', base .. 'par', id) end
end
return 1
"""

# KEYS: the key's hash; ARGV: amount, now, the period end to set if the stored one passed
_ADD_SPEND = """
local reset_at = tonumber(redis.call('HGET', KEYS[1], 'reset_at') or '')
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if reset_at and reset_at <= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'spend', ARGV[1], 'reset_at', ARGV[3])
else
  redis.call('HINCRBYFLOAT', KEYS[1], 'spend', ARGV[1])
end
return 1
"""


@attrs.define(slots=True, eq=False)
class _Call:
    """One admission's script call, waiting for its place in a pipeline."""

    keys: list[str]
    args: list[object]
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: Any = None
    error: BaseException | None = None
    lead: bool = False  # woken to send the next batch (its own call included)


class _Redis:
    """A blocking pool, run in worker threads with a limiter of its own."""

    def __init__(self, url: str, prefix: str, *, timeout: float = 1.0, connections: int = 8):
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=connections, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        # Any: redis-py's stubs type replies as bytes | str | Awaitable, whatever the client.
        self.redis: Any = redis.Redis(connection_pool=pool)
        self.prefix = prefix
        self._limiter = trio.CapacityLimiter(connections)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self._limiter, abandon_on_cancel=True
        )

    def close(self) -> None:
        self.redis.close()
        self.redis.connection_pool.disconnect()


class FleetLimits:
    """Limits kept exactly in Redis for the whole fleet: keys' and the operator's."""

    def __init__(
        self, url: str, prefix: str, instances: Callable[[], int], request_timeout: float = 600.0
    ) -> None:
        self._r = _Redis(url, prefix)
        self._parallel_ttl_ms = int((request_timeout + PARALLEL_GRACE_SECS) * 1000)
        self._admit = self._r.redis.register_script(_ADMIT)
        self._settle = self._r.redis.register_script(_SETTLE)
        self._live = instances
        self._ids = itertools.count()
        self._me = os.urandom(4).hex()  # request ids unique across instances
        self._retry_at = -1.0
        self._queue: list[tuple[str, str, int, bool]] = []
        self._wake = trio.Event()
        self._calls: list[_Call] = []  # admissions waiting for the batch in flight
        self._sending = False

    @staticmethod
    def key_group(token: str) -> str:
        """The Redis name (after the prefix) of a key's counters."""
        return f"rl:{token}:"

    @staticmethod
    def scope_group(name: str) -> str:
        """The Redis name (after the prefix) of the operator's counters for a model, or '*'."""
        return f"rls:{name}:"

    @property
    def up(self) -> bool:
        return trio.current_time() >= self._retry_at

    @property
    def instances(self) -> int:
        return max(1, self._live())

    def status(self) -> dict[str, object]:
        return {"limits": "fleet" if self.up else "local"}

    def _down(self, exc: BaseException) -> None:
        if self.up:
            log.warning("Redis unreachable for rate limits (%s): per-instance limits, "
                        "each 1/%d of the fleet's", exc, self.instances)
        self._retry_at = trio.current_time() + RETRY_SECS

    async def admit(
        self, groups: Sequence[tuple[str, Limits]], estimate: int
    ) -> list[Ticket] | tuple[int, Refusal] | None:
        """The fleet's decision on every group of limits at once — `(key_group(token) or
        scope_group(name), limits)` — in one script call: a ticket per group, or the index of
        the first group that refuses and why (the others took nothing); None when Redis
        cannot be asked."""
        ref = f"{self._me}:{next(self._ids)}"
        prefix = self._r.prefix
        keys = [f"{prefix}{group}{name}" for group, _ in groups
                for name in ("req", "tok", "tokw", "tokt", "burst", "par")]
        args: list[object] = [ref, estimate, self._parallel_ttl_ms]
        for _, limits in groups:
            args += [limits.rpm or 0, limits.tpm or 0, limits.burst or 0, limits.parallel or 0]
        try:
            raw = await self._evaluate(keys, args)
        except (redis.RedisError, OSError) as exc:
            self._down(exc)
            return None
        except trio.Cancelled:  # the client left: the script may have run; free its slots
            for group, limits in groups:
                if limits.parallel is not None:
                    self._queue.append((group, ref, -1, True))
                    self._wake.set()
            raise
        if not raw[0]:
            index = int(raw[1]) - 1
            wreq, wtok, wpar, left_req, reset_req, left_tok, reset_tok = (
                float(x) for x in raw[2:]
            )
            limits = groups[index][1]
            figures = Figures(limits.rpm, int(left_req), reset_req / 1000, limits.tpm,
                              int(left_tok), reset_tok / 1000)
            waits = {"requests": wreq, "tokens": wtok, "parallel": wpar}
            which = max(waits, key=lambda name: waits[name])
            return index, Refusal(which, waits[which] / 1000, figures)
        tickets = []
        for i, (_, limits) in enumerate(groups):
            left_req, reset_req, left_tok, reset_tok = raw[2 + 4 * i: 6 + 4 * i]
            figures = Figures(limits.rpm, int(left_req), reset_req / 1000, limits.tpm,
                              int(left_tok), reset_tok / 1000)
            tickets.append(Ticket(figures, None, limits.parallel is not None, ref))
        return tickets

    async def _evaluate(self, keys: list[str], args: list[object]) -> Any:
        """The admission script's reply. Admissions arriving while a batch is in flight wait
        and go together in the next one: still one script call each, but one worker-thread
        hop and one round trip per batch (the hop, not Redis, is most of a call's CPU)."""
        call = _Call(keys, args)
        self._calls.append(call)
        if not self._sending:
            await self._send()
        else:
            try:
                await call.done.wait()
            except trio.Cancelled:  # the client left: never strand the calls behind it
                if call.lead:
                    await self._send()
                elif call in self._calls:
                    self._calls.remove(call)
                raise
            if call.lead:
                await self._send()
        if call.error is not None:
            raise call.error
        return call.reply

    async def _send(self) -> None:
        """Send every waiting call in one pipeline; then hand the next batch to its first."""
        self._sending = True
        batch, self._calls = self._calls, []
        try:
            # Shielded: the others' replies ride on it (bounded by the socket timeout).
            with trio.CancelScope(shield=True):
                replies = await self._r.run(self._pipeline, batch)
            for call, reply in zip(batch, replies, strict=True):
                if isinstance(reply, Exception):
                    call.error = reply
                else:
                    call.reply = reply
        except (redis.RedisError, OSError) as exc:
            for call in batch:
                call.error = exc
        finally:
            for call in batch:
                if call.reply is None and call.error is None:
                    call.error = redis.RedisError("the batch was not sent")
                call.done.set()
            if self._calls:
                self._calls[0].lead = True
                self._calls[0].done.set()
            else:
                self._sending = False

    def _pipeline(self, batch: Sequence[_Call]) -> list[Any]:
        """(In a worker thread.) The calls' replies, or the error of each that failed."""
        if len(batch) == 1:  # the Script object loads the script if Redis lacks it
            return [self._admit(keys=batch[0].keys, args=batch[0].args)]
        replies: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        for attempt in range(2):
            pipe = self._r.redis.pipeline(transaction=False)
            for i in todo:
                pipe.evalsha(self._admit.sha, len(batch[i].keys), *batch[i].keys, *batch[i].args)
            for i, reply in zip(todo, pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
            todo = [i for i in todo if isinstance(replies[i], redis.exceptions.NoScriptError)]
            if not todo:
                break
            if attempt == 0:  # Redis restarted (or a new one): load it, send those again
                self._r.redis.script_load(_ADMIT)
        return replies

    def settle(self, group: str, ticket: Ticket, tokens: int | None) -> None:
        """The request ended: its real tokens replace the estimate in `group`'s window, its
        parallel slot there frees (sent in the next batch)."""
        if ticket.ref is None:
            return
        if not ticket.parallel and (tokens is None or ticket.figures.limit_tokens is None):
            return  # nothing held there: no slot, no tokens window (e.g. an rpm limit only)
        self._queue.append((group, ticket.ref, -1 if tokens is None else tokens,
                            ticket.parallel))
        ticket.parallel = False
        self._wake.set()

    async def run(self) -> None:
        """Send the settled requests, as soon as there are some, in one script call."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.send_settled()
            except (redis.RedisError, OSError) as exc:
                # Lost: the windows forget estimates within a minute and the parallel slots
                # expire; the alternative, holding them, would grow without bound.
                self._down(exc)
                await trio.sleep(RETRY_SECS)

    async def send_settled(self) -> None:
        """What settled since the last call, in one script call."""
        batch, self._queue = self._queue, []
        if not batch:
            return
        args: list[Any] = [self._r.prefix]
        for group, ref, used, parallel in batch:
            args += [group, ref, used, "1" if parallel else "0"]
        await self._r.run(self._settle, keys=[], args=args)

    def close(self) -> None:
        self._r.close()


class RedisKeyStore:
    """The gate's KeyStore for a fleet: a hash per key (`record` JSON, `spend`, `reset_at`),
    a set of tokens, alias -> token, a version counter, spend logs (capped) and daily sums."""

    LOGS_KEPT = 100_000

    def __init__(self, url: str, prefix: str) -> None:
        self._r = _Redis(url, prefix)
        self.p = prefix
        self._add_spend = self._r.redis.register_script(_ADD_SPEND)

    def _key(self, token: str) -> str:
        return f"{self.p}key:{token}"

    async def get(self, token: str) -> KeyRecord | None:
        raw = await self._r.run(self._r.redis.hmget, self._key(token),
                                ["record", "spend", "reset_at"])
        return _record(raw)

    async def find_alias(self, alias: str) -> KeyRecord | None:
        token = await self._r.run(self._r.redis.get, f"{self.p}alias:{alias}")
        return None if token is None else await self.get(token.decode())

    async def list_keys(self) -> list[KeyRecord]:
        tokens = await self._r.run(self._r.redis.smembers, f"{self.p}keys")
        records = [await self.get(token.decode()) for token in tokens]
        return sorted((r for r in records if r is not None), key=lambda r: r.created_at)

    async def put(self, record: KeyRecord) -> None:
        def put() -> None:
            old = self._r.redis.hget(self._key(record.token), "record")
            pipe = self._r.redis.pipeline()
            if old is not None:
                previous = orjson.loads(old).get("key_alias")
                if previous and previous != record.key_alias:
                    pipe.delete(f"{self.p}alias:{previous}")
            fields: dict[str, Any] = {"record": orjson.dumps(_fields(record))}
            if record.budget_reset_at is not None:
                fields["reset_at"] = repr(record.budget_reset_at)
            else:
                pipe.hdel(self._key(record.token), "reset_at")
            pipe.hset(self._key(record.token), mapping=fields)
            pipe.hsetnx(self._key(record.token), "spend", "0")
            pipe.sadd(f"{self.p}keys", record.token)
            if record.key_alias:
                pipe.set(f"{self.p}alias:{record.key_alias}", record.token)
            pipe.incr(f"{self.p}keys:version")
            pipe.execute()

        await self._r.run(put)

    async def delete(self, tokens: Sequence[str]) -> list[str]:
        gone = []
        for token in tokens:
            record = await self.get(token)
            if record is None:
                continue
            pipe = self._r.redis.pipeline()
            pipe.delete(self._key(token))
            pipe.srem(f"{self.p}keys", token)
            if record.key_alias:
                pipe.delete(f"{self.p}alias:{record.key_alias}")
            pipe.incr(f"{self.p}keys:version")
            await self._r.run(pipe.execute)
            gone.append(token)
        return gone

    async def version(self) -> int:
        raw = await self._r.run(self._r.redis.get, f"{self.p}keys:version")
        return int(raw or 0)

    async def add_spend(self, records: Sequence[SpendRecord]) -> None:
        periods: dict[str, float] = {}
        for token in {rec.token for rec in records}:
            record = await self.get(token)
            if record is not None and records:
                periods[token] = current_period(record, records[-1].at)[0]

        def add() -> None:
            pipe = self._r.redis.pipeline()
            for rec in records:
                if rec.token in periods:
                    self._add_spend(keys=[self._key(rec.token)], args=[
                        repr(rec.spend), repr(rec.at), repr(periods[rec.token])], client=pipe)
                pipe.lpush(f"{self.p}spend_logs", orjson.dumps({
                    "request_id": rec.request_id, "api_key": rec.token, "model": rec.model,
                    "node": rec.node, "prompt_tokens": rec.prompt_tokens,
                    "completion_tokens": rec.completion_tokens, "spend": rec.spend, "at": rec.at,
                }))
                field = f"{rec.token}|{rec.model}|{_day(rec.at)}"
                pipe.hincrbyfloat(f"{self.p}spend_daily:spend", field, rec.spend)
                pipe.hincrby(f"{self.p}spend_daily:prompt", field, rec.prompt_tokens)
                pipe.hincrby(f"{self.p}spend_daily:completion", field, rec.completion_tokens)
                pipe.hincrby(f"{self.p}spend_daily:requests", field, 1)
            pipe.ltrim(f"{self.p}spend_logs", 0, self.LOGS_KEPT - 1)
            pipe.execute()

        await self._r.run(add)

    async def spend_logs(self, token: str | None = None, limit: int = 100
                         ) -> list[dict[str, Any]]:
        raw = await self._r.run(self._r.redis.lrange, f"{self.p}spend_logs", 0, -1)
        logs = [orjson.loads(item) for item in raw]
        return [log for log in logs if token is None or log["api_key"] == token][:limit]

    async def spend_daily(self, token: str | None = None) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            h = {name: self._r.redis.hgetall(f"{self.p}spend_daily:{name}")
                 for name in ("spend", "prompt", "completion", "requests")}
            rows = []
            for field, spend in h["spend"].items():
                key, model, day = field.decode().split("|", 2)
                if token is None or key == token:
                    rows.append({
                        "api_key": key, "model": model, "day": day, "spend": float(spend),
                        "prompt_tokens": int(h["prompt"].get(field, 0)),
                        "completion_tokens": int(h["completion"].get(field, 0)),
                        "requests": int(h["requests"].get(field, 0)),
                    })
            return sorted(rows, key=lambda row: (row["day"], row["model"]))

        return await self._r.run(read)

    def close(self) -> None:
        self._r.close()


def _fields(record: KeyRecord) -> dict[str, Any]:
    values = {name: getattr(record, name) for name in (
        "token", "key_name", "key_alias", "models", "rpm_limit", "tpm_limit", "rpm_burst",
        "max_parallel_requests", "max_budget", "budget_duration", "expires", "metadata",
        "created_at",
    )}
    values["metadata"] = dict(record.metadata)
    return values


def _record(raw: Sequence[bytes | None]) -> KeyRecord | None:
    record, spend, reset_at = raw
    if record is None:
        return None
    values = orjson.loads(record)
    values["models"] = tuple(values["models"])
    return KeyRecord(
        **values, spend=float(spend or 0),
        budget_reset_at=float(reset_at) if reset_at is not None else None,
    )
