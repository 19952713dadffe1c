"""The fleet's shared memory in Redis: a thin I/O shell over redis-py's sync client.

There is no maintained trio-native Redis client (redis.asyncio does not run under trio), so
every call runs in a worker thread through `trio.to_thread` with its own limiter and a
blocking connection pool. One Lua script does a whole sync in one round trip, timed by Redis's
own clock so that instances on different machines agree on expiry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import redis
import trio

T = TypeVar("T")

# KEYS: instances (zset id -> expiry ms), leader, registry, prefs, breakers (hash node -> until),
#       grants (hash "id|node" -> "granted demand")
# ARGV: id, ttl_ms, this instance's demand (JSON node -> [cap, base share, in flight, in flight
#       + waiting, local limit now]), the key prefix, then pairs node, open_for_ms of breakers
#       it saw open
# Capacity is granted here, one sync at a time, so the grants of a node never add up to more
# than its cap: an instance takes only what the others' grants leave. It asks for its base
# share, or all it needs if no other instance is short; when another one is short (it waits
# for more than it holds) it gives back down to its base share, or to what it needs if that is
# less, never below what it has in flight. What an instance holds for the others is the larger
# of its grant and the limit it enforces now: a smaller grant is in force only once it has
# been applied, so the others see it a sync later.
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
-- An instance whose heartbeat expired is no longer live (no share, no lease), but its grants
-- still count for two more TTLs: it may only be slow, and still admitting under them.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 2 * ttl)
redis.call('PEXPIRE', KEYS[1], 3 * ttl)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local counted = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do counted[id] = true end
local mine = cjson.decode(ARGV[3])
local held, short = {}, {}
local all_grants = redis.call('HGETALL', KEYS[6])
for i = 1, #all_grants, 2 do
  local sep = string.find(all_grants[i], '|', 1, true)
  local id, node = string.sub(all_grants[i], 1, sep - 1), string.sub(all_grants[i], sep + 1)
  if not counted[id] or id == ARGV[1] then
    if id ~= ARGV[1] or mine[node] == nil then redis.call('HDEL', KEYS[6], all_grants[i]) end
  else
    local space = string.find(all_grants[i + 1], ' ', 1, true)
    local granted = tonumber(string.sub(all_grants[i + 1], 1, space - 1))
    local wanted = tonumber(string.sub(all_grants[i + 1], space + 1))
    held[node] = (held[node] or 0) + granted
    if wanted > granted then short[node] = true end
  end
end
local grants = {}
for node, v in pairs(mine) do
  local cap, base, inflight, wanted, limit = v[1], v[2], v[3], v[4], v[5]
  local target
  if short[node] then target = math.min(base, wanted) else target = math.max(base, wanted) end
  target = math.max(target, inflight)
  local granted = math.max(0, math.min(target, cap - (held[node] or 0)))
  local holds = math.max(granted, limit)
  redis.call('HSET', KEYS[6], ARGV[1] .. '|' .. node, holds .. ' ' .. wanted)
  table.insert(grants, node)
  table.insert(grants, granted)
end
redis.call('PEXPIRE', KEYS[6], 3 * ttl)
local leader = redis.call('GET', KEYS[2])
if not leader or leader == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ttl)
  leader = ARGV[1]
end
for i = 5, #ARGV, 2 do
  local until_ms = now + tonumber(ARGV[i + 1])
  local current = tonumber(redis.call('HGET', KEYS[5], ARGV[i]) or '0')
  if until_ms > current then redis.call('HSET', KEYS[5], ARGV[i], until_ms) end
end
local open = {}
local longest = 0
local all = redis.call('HGETALL', KEYS[5])
for i = 1, #all, 2 do
  local until_ms = tonumber(all[i + 1])
  if until_ms <= now then
    redis.call('HDEL', KEYS[5], all[i])
  else
    table.insert(open, all[i])
    table.insert(open, all[i + 1])
    if until_ms - now > longest then longest = until_ms - now end
  end
end
if longest > 0 then redis.call('PEXPIRE', KEYS[5], longest) end
if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('PEXPIRE', KEYS[4], ttl) end
return {now, live, leader, redis.call('GET', KEYS[3]), redis.call('GET', KEYS[4]), open, grants}
"""

# KEYS: instances, leader, grants; ARGV: id
_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
local all = redis.call('HKEYS', KEYS[3])
for _, field in ipairs(all) do
  if string.sub(field, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
    redis.call('HDEL', KEYS[3], field)
  end
end
return 1
"""


@attrs.frozen
class SyncResult:
    now_ms: int  # Redis's clock
    instances: tuple[str, ...]  # live instance ids, sorted
    leader: str
    registry: bytes | None  # the leader's node table (JSON)
    prefs: bytes | None  # the fleet's admin preferences (JSON)
    breakers: Mapping[str, int]  # node key -> open until (Redis ms)
    grants: Mapping[str, int]  # capped node -> requests this instance may have in flight


class RedisStore:
    def __init__(self, url: str, prefix: str, *, timeout: float = 1.0, connections: int = 4):
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self.redis = redis.Redis(connection_pool=pool)
        self.prefix = prefix
        self._limiter = trio.CapacityLimiter(connections)
        self._sync = self.redis.register_script(_SYNC)
        self._leave = self.redis.register_script(_LEAVE)

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    async def _run(self, fn: Callable[[], T]) -> T:
        # abandon_on_cancel: a cancelled request does not wait for its thread; the socket
        # timeout bounds how long that thread lives.
        return await trio.to_thread.run_sync(fn, limiter=self._limiter, abandon_on_cancel=True)

    async def sync(
        self, instance: str, ttl: float, breakers: Mapping[str, float] | None = None,
        demand: bytes = b"{}",
    ) -> SyncResult:
        """Heartbeat, lease, capacity grants, breaker exchange, registry and prefs in one round
        trip. `demand`: JSON node -> [cap, base share, in flight, in flight + waiting]."""
        args: list[Any] = [instance, int(ttl * 1000), demand, self.prefix]
        for node, open_for in (breakers or {}).items():
            args += [node, max(1, int(open_for * 1000))]
        keys = [self.key(k) for k in
                ("instances", "leader", "registry", "prefs", "breakers", "grants")]
        raw = await self._run(functools.partial(self._sync, keys=keys, args=args))
        now, instances, leader, registry, prefs, open_list, grants = raw
        return SyncResult(
            now_ms=int(now),
            instances=tuple(sorted(i.decode() for i in instances)),
            leader=leader.decode(),
            registry=registry,
            prefs=prefs,
            breakers={
                open_list[i].decode(): int(open_list[i + 1]) for i in range(0, len(open_list), 2)
            },
            grants={grants[i].decode(): int(grants[i + 1]) for i in range(0, len(grants), 2)},
        )

    async def put(self, name: str, value: bytes, ttl: float) -> None:
        await self._run(
            functools.partial(self.redis.set, self.key(name), value, px=max(1, int(ttl * 1000)))
        )

    async def leave(self, instance: str) -> None:
        """Drop this instance's heartbeat and lease at once, so the fleet need not wait for
        the TTLs."""
        keys = [self.key("instances"), self.key("leader"), self.key("grants")]
        await self._run(functools.partial(self._leave, keys=keys, args=[instance]))

    def close(self) -> None:
        self.redis.close()
        self.redis.connection_pool.disconnect()
