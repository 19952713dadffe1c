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

# KEYS: instances (zset id -> expiry ms), leader, registry, prefs, breakers (hash node -> until)
# ARGV: id, ttl_ms, this instance's load (JSON node -> in flight), the key prefix, then pairs
#       node, open_for_ms of breakers this instance saw open
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SET', ARGV[4] .. 'load:' .. ARGV[1], ARGV[3], 'PX', ttl)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local loads = {}
for _, id in ipairs(live) do
  table.insert(loads, id)
  table.insert(loads, redis.call('GET', ARGV[4] .. 'load:' .. id))
end
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
return {now, live, leader, redis.call('GET', KEYS[3]), redis.call('GET', KEYS[4]), open, loads}
"""

# KEYS: instances, leader; ARGV: id
_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
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
    loads: Mapping[str, bytes]  # instance -> its in-flight requests per capped node (JSON)


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
        load: bytes = b"{}",
    ) -> SyncResult:
        """Heartbeat, lease, loads, breaker exchange, registry and prefs in one round trip."""
        args: list[Any] = [instance, int(ttl * 1000), load, self.prefix]
        for node, open_for in (breakers or {}).items():
            args += [node, max(1, int(open_for * 1000))]
        keys = [self.key(k) for k in ("instances", "leader", "registry", "prefs", "breakers")]
        raw = await self._run(functools.partial(self._sync, keys=keys, args=args))
        now, instances, leader, registry, prefs, open_list, loads = raw
        return SyncResult(
            now_ms=int(now),
            instances=tuple(sorted(i.decode() for i in instances)),
            leader=leader.decode(),
            registry=registry,
            prefs=prefs,
            breakers={
                open_list[i].decode(): int(open_list[i + 1]) for i in range(0, len(open_list), 2)
            },
            loads={
                loads[i].decode(): loads[i + 1] for i in range(0, len(loads), 2) if loads[i + 1]
            },
        )

    async def put(self, name: str, value: bytes, ttl: float) -> None:
        await self._run(
            functools.partial(self.redis.set, self.key(name), value, px=max(1, int(ttl * 1000)))
        )

    async def leave(self, instance: str) -> None:
        """Drop this instance's heartbeat and lease at once, so the fleet need not wait for
        the TTLs."""
        keys = [self.key("instances"), self.key("leader"), self.key(f"load:{instance}")]
        await self._run(functools.partial(self._leave, keys=keys, args=[instance]))

    def close(self) -> None:
        self.redis.close()
        self.redis.connection_pool.disconnect()
