"""Several lb instances behaving as one, through Redis, with no Redis on the request path.

Every instance runs `Fleet.run`, which syncs every `sync_secs` (one round trip): it renews its
heartbeat, learns the live instances, tries to hold the scanner lease, exchanges breaker
openings, and reads the leader's node table and the fleet's admin preferences. What it learns
is applied to the in-process registry, which is all the request path reads.

Fleet-wide capacity: Redis grants each instance a part of a node's cap at each sync, in the
sync script, so the grants never add up to more than the cap. An instance asks for its base
share (computed from the sorted live instance ids, so the base shares add up to the cap), or
for all it needs (in flight + waiting) if no other instance is short; an instance gives back
down to its base share, or to what it needs, when another one is short, never below what it
has in flight. So a request waits in one instance while another has a free slot for at most
about two syncs, not until QUEUE_TIMEOUT_SECS.

If Redis goes away, everything keeps working on the last known state: each instance scans for
itself, keeps its last shares, reports `redis: down`, and reconnects with backoff.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence

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
        # node -> (fleet-wide cap, in flight from here, in flight + waiting here, local limit)
        demand: Callable[[], dict[str, tuple[int, int, int, int]]],
        # The live instances changed: each keeps 1/n of the nodes' own rpm/tpm.
        instances_changed: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.demand = demand
        self.instances_changed = instances_changed
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
        self._last_table: bytes | None = None
        self._unsent_breakers: dict[str, float] = {}
        self._tripped: dict[str, int] = {}  # node -> the shared opening last applied here
        self._grants: Mapping[str, int] = {}  # node -> our part of its cap, from Redis
        self._sync_lock = trio.Lock()

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
        # Not serving yet: hold nothing until Redis grants it (others count what we hold).
        self.hooks.set_local_caps({key: 0 for key, cap in self.hooks.caps().items() if cap})
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
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECS)
                continue
            await trio.sleep(self.sync_secs)

    async def sync_once(self) -> None:
        # One at a time: a grant applied after a newer one would exceed what Redis counts.
        async with self._sync_lock:
            await self._sync()

    async def _sync(self, *, again: bool = False) -> None:
        opened = self.hooks.take_opened_breakers()
        self._unsent_breakers.update(opened)
        demand = orjson.dumps({
            key: [cap, share(cap, self.instances, self.id, key) or 0, inflight, wanted, limit]
            for key, (cap, inflight, wanted, limit) in self.hooks.demand().items()
        })
        result = await self.store.sync(self.id, self.ttl, self._unsent_breakers, demand)
        self._unsent_breakers = {}
        if not self.redis_up:
            log.info("redis is up; instance %s joins the fleet", self.id)
        self.redis_up = True
        self.syncs += 1
        was_leader, self.leader = self.leader, result.leader == self.id
        if self.leader and not was_leader:
            log.info("instance %s now leads scanning", self.id)
        if len(result.instances) != len(self.instances):
            self.hooks.instances_changed(len(result.instances))
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
        self._grants = result.grants
        if not self._apply_grants() and not again:
            await self._sync(again=True)  # the new cap's grant now, not a sync later

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

    def _apply_grants(self) -> bool:
        """The local limits from the last grants (a lowered cap applies at once); False if a
        node was capped since: it holds nothing until Redis grants it a part."""
        local: dict[str, int | None] = {}
        complete = True
        for key, cap in self.hooks.caps().items():
            if not cap:
                local[key] = None
            else:
                local[key] = min(self._grants.get(key, 0), cap)
                complete = complete and key in self._grants
        self.hooks.set_local_caps(local)
        return complete

    async def prefs_changed(self, prefs: Prefs) -> bool:
        """An admin change made here (already applied by `set_prefs`, which gives every node
        its whole cap): share it, and go back to what Redis granted, asking at once for the
        nodes it caps anew. With Redis away the whole caps stay, as for a lone instance."""
        if not await self.publish_prefs(prefs):
            return False
        if not self._apply_grants():
            with contextlib.suppress(redis.RedisError, OSError):
                await self.sync_once()
        return True

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
