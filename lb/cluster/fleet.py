"""Several lb instances behaving as one, through Redis, with no Redis on the request path.

Every instance runs `Fleet.run`, which syncs every `sync_secs` (one round trip): it renews its
heartbeat, learns the live instances, tries to hold the scanner lease, exchanges breaker
openings, and reads the leader's node table and the fleet's admin preferences. What it learns
is applied to the in-process registry, which is all the request path reads.

Fleet-wide capacity: each instance may hold a share of a node's cap, computed from the sorted
live instance ids, so the shares add up to the cap. A new instance takes its share only after
its heartbeat has been visible for two syncs, when every other instance has shrunk its own; and
while another instance still has more in flight than its new share (admitted before the
change), the difference is held back. Each instance publishes its in-flight counts per node
with its heartbeat for that.

If Redis goes away, everything keeps working on the last known state: each instance scans for
itself, keeps its last shares, reports `redis: down`, and reconnects with backoff.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence

import orjson
import redis
import trio

from lb.cluster.prefs import Prefs
from lb.cluster.redis_store import RedisStore, SyncResult

log = logging.getLogger("lb.fleet")

MAX_BACKOFF_SECS = 5.0


def share(cap: int, instances: Sequence[str], me: str, node_key: str) -> int | None:
    """This instance's part of a fleet-wide cap (None: no cap). The remainder of an uneven
    split goes to instances at an offset that depends on the node, so that with many nodes
    capped below the fleet size no instance is always the one left out."""
    if cap <= 0:
        return None
    if me not in instances:
        return 0
    n = len(instances)
    offset = int.from_bytes(hashlib.blake2b(node_key.encode(), digest_size=4).digest(), "big")
    position = (instances.index(me) - offset) % n
    return cap // n + (1 if position < cap % n else 0)


class FleetHooks:
    """What the fleet needs from the rest of lb, so it stays testable on its own."""

    def __init__(
        self,
        *,
        caps: Callable[[], dict[str, int]],  # node key -> fleet-wide cap (0 = none)
        set_local_caps: Callable[[dict[str, int | None]], None],
        export_table: Callable[[], bytes],
        import_table: Callable[[bytes], None],
        get_prefs: Callable[[], Prefs],
        set_prefs: Callable[[Prefs], None],
        take_opened_breakers: Callable[[], dict[str, float]],  # node -> seconds still open
        trip_breaker: Callable[[str, float], None],  # node, seconds to stay open
        # node -> the part of its cap this instance may be using (its local cap, or more in
        # flight): what the others must leave it.
        held: Callable[[], dict[str, int]],
    ) -> None:
        self.held = held
        self.caps = caps
        self.set_local_caps = set_local_caps
        self.export_table = export_table
        self.import_table = import_table
        self.get_prefs = get_prefs
        self.set_prefs = set_prefs
        self.take_opened_breakers = take_opened_breakers
        self.trip_breaker = trip_breaker


class Fleet:
    def __init__(
        self,
        store: RedisStore,
        hooks: FleetHooks,
        *,
        instance_id: str,
        sync_secs: float = 0.5,
        table_ttl: float = 30.0,
    ) -> None:
        self.store = store
        self.hooks = hooks
        self.id = instance_id
        self.sync_secs = sync_secs
        self.ttl = max(3 * sync_secs, 1.0)  # heartbeat and lease
        self.table_ttl = table_ttl
        self.redis_up = False
        self.leader = False
        self.instances: tuple[str, ...] = ()
        self.syncs = 0
        self._seen_since: float | None = None  # when our heartbeat was first seen
        self._last_table: bytes | None = None
        self._unsent_breakers: dict[str, float] = {}
        self._tripped: dict[str, int] = {}  # node -> the shared opening last applied here

    @property
    def should_scan(self) -> bool:
        """The leader scans; without Redis every instance scans for itself."""
        return self.leader or not self.redis_up

    def status(self) -> dict[str, object]:
        return {
            "redis": "up" if self.redis_up else "down",
            "instance": self.id,
            "leader": self.leader,
            "instances": list(self.instances),
        }

    async def join(self) -> None:
        """Learn the fleet's prefs and leader, and wait until the other instances count us, so
        that we serve from the start with our share of every node's cap (Redis down: go on)."""
        with trio.move_on_after(3 * self.sync_secs + 2), contextlib.suppress(
            redis.RedisError, OSError
        ):
            await self.sync_once()
            await trio.sleep(2 * self.sync_secs)
            await self.sync_once()

    async def run(self) -> None:
        backoff = self.sync_secs
        while True:
            try:
                await self.sync_once()
                backoff = self.sync_secs
            except (redis.RedisError, OSError) as exc:
                if self.redis_up:
                    log.warning("redis is down (%s); keeping the last known state", exc)
                self.redis_up = False
                self.leader = False
                self._seen_since = None
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECS)
                continue
            await trio.sleep(self.sync_secs)

    async def sync_once(self) -> None:
        opened = self.hooks.take_opened_breakers()
        self._unsent_breakers.update(opened)
        load = orjson.dumps(self.hooks.held())
        result = await self.store.sync(self.id, self.ttl, self._unsent_breakers, load)
        self._unsent_breakers = {}
        if not self.redis_up:
            log.info("redis is up; instance %s joins the fleet", self.id)
        self.redis_up = True
        self.syncs += 1
        now = trio.current_time()
        if self._seen_since is None:
            self._seen_since = now
        was_leader, self.leader = self.leader, result.leader == self.id
        if self.leader and not was_leader:
            log.info("instance %s now leads scanning", self.id)
        self.instances = result.instances
        await self._apply_prefs(result)
        if not self.leader and result.registry and result.registry != self._last_table:
            self._last_table = result.registry
            self.hooks.import_table(result.registry)
        for node, until_ms in result.breakers.items():
            if self._tripped.get(node) != until_ms:  # each opening once: a probe may close it
                self._tripped[node] = until_ms
                self.hooks.trip_breaker(node, (until_ms - result.now_ms) / 1000)
        self._tripped = {node: self._tripped[node] for node in result.breakers}
        self._apply_shares(now, result)

    async def _apply_prefs(self, result: SyncResult) -> None:
        local = self.hooks.get_prefs()
        if result.prefs is None:
            if local.version > 0:  # Redis lost them (restart): the fleet's last word is ours
                await self.publish_prefs(local)
            return
        shared = Prefs.from_json(orjson.loads(result.prefs))
        if shared == local:
            return
        if shared.version >= local.version:  # a tie between two writers: Redis's copy wins
            self.hooks.set_prefs(shared)
        else:  # changed here while Redis was away
            await self.publish_prefs(local)

    @property
    def settled(self) -> bool:
        """Our heartbeat has been visible long enough for every instance to count us."""
        return (
            self._seen_since is not None
            and trio.current_time() - self._seen_since >= 2 * self.sync_secs
        )

    def _apply_shares(self, now: float, result: SyncResult) -> None:
        loads = {}
        for instance, raw in result.loads.items():
            if instance != self.id:
                with contextlib.suppress(ValueError):
                    loads[instance] = orjson.loads(raw)
        local: dict[str, int | None] = {}
        for key, cap in self.hooks.caps().items():
            mine = share(cap, self.instances, self.id, key)
            if mine is None or not self.settled:
                local[key] = None if mine is None else 0
                continue
            # Another instance may still hold more than its new share (its local cap from before
            # it heard of us, or requests it admitted then): take only what is really free.
            others = sum(
                max(int(loads.get(other, {}).get(key, 0)), share(cap, self.instances, other, key)
                    or 0)
                for other in self.instances if other != self.id
            )
            local[key] = max(0, min(mine, cap - others))
        self.hooks.set_local_caps(local)

    async def publish_table(self) -> None:
        """The leader shares its node table after each scan."""
        if not self.leader:
            return
        table = self.hooks.export_table()
        try:
            await self.store.put("registry", table, self.table_ttl)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not publish the node table: %s", exc)

    async def publish_prefs(self, prefs: Prefs) -> bool:
        try:
            await self.store.put("prefs", orjson.dumps(prefs.to_json()), self.ttl)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not share admin preferences: %s", exc)
            return False
        return True

    async def leave(self) -> None:
        with trio.move_on_after(1):
            with contextlib.suppress(redis.RedisError, OSError):
                await self.store.leave(self.id)
