"""Wires the parts together and runs the root nursery of `lb serve`."""

from __future__ import annotations

import errno
import gc
import logging
import resource
import signal
import socket
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs
import orjson
import trio

from lb.api import admin, anthropic, debug, health, keys, metrics, nodes, proxy, stats
from lb.cluster import scanner
from lb.cluster.node import Node
from lb.cluster.prefs import Prefs
from lb.cluster.registry import Registry
from lb.config import ConfigError, NodeConfig, Settings
from lb.http.cors import CorsPolicy
from lb.http.routes import Router
from lb.http.server import HTTPServer, ServerLimits
from lb.obs.access_log import AccessLog
from lb.obs.latency import LatencyTracker
from lb.obs.logs import flush_logs, flush_logs_forever
from lb.obs.metrics import Metrics, MetricsCollector
from lb.obs.nodes import NodeCounters
from lb.obs.observer import Observers, RequestObserver
from lb.obs.stats import RoutingStats
from lb.routing import strategies
from lb.routing.dispatch import Dispatcher
from lb.supervise import ServiceStats, supervise

if TYPE_CHECKING:
    from lb.cluster.fleet import Fleet
    from lb.policy.gate import Gate
    from lb.workers import WorkerInfo

log = logging.getLogger("lb")

FORCED_EXIT = 1


def raise_open_files_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: client connections, node connections
    and the server's connection limit (half the soft limit by default) all need descriptors.
    A failure leaves the limit as it was."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("open files limit raised from %d to %d", soft, hard)
    except (OSError, ValueError) as exc:
        log.debug("open files limit left as it was: %s", exc)


def listen_url(settings: Settings, port: int) -> str:
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{shown}:{port}"


def server_limits(settings: Settings) -> ServerLimits:
    return ServerLimits(
        max_header_bytes=settings.max_header_bytes,
        max_body_bytes=settings.max_body_bytes,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        send_timeout=settings.send_timeout,
        max_connections=settings.max_connections,
        keepalive_timeout=settings.keepalive_timeout,
    )


async def open_listeners(settings: Settings) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(settings.port, host=settings.host)
    except OSError as exc:
        reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(
            f"LOAD_BALANCER_PORT={settings.port}: cannot listen on {settings.host}: {reason}"
        ) from None


async def start_demo_nodes(nursery: trio.Nursery) -> tuple[NodeConfig, ...]:
    """Two mock nodes in this process, sharing one chat model and each with one of its own."""
    from lb.testing import MockNode

    specs = [
        ("demo-a", ("llama-3.1-8b-demo", "nomic-embed-text-demo")),
        ("demo-b", ("llama-3.1-8b-demo", "qwen3-0.6b-demo")),
    ]
    nodes = []
    for name, models in specs:
        mock = MockNode(models=models, name=name, ttft_ms=40, itl_ms=15, tokens=16)
        port = await nursery.start(mock.serve, "127.0.0.1", 0)
        nodes.append(NodeConfig(url=f"http://127.0.0.1:{port}"))
        log.info("demo node %s on 127.0.0.1:%d serves %s", name, port, ", ".join(models))
    return tuple(nodes)


def build_registry(settings: Settings) -> Registry:
    return Registry(
        (Node.from_settings(config, settings) for config in settings.all_nodes()),
        prefs=Prefs(
            preferred_models=settings.preferred_models, traffic_split=settings.traffic_split
        ),
    )


def build_fleet(settings: Settings, registry: Registry, address: str, port: int) -> Fleet:
    # Imported here: redis-py costs ~8 MB and 0.1 s at start, for fleets only.
    from lb.cluster.fleet import Fleet, FleetHooks
    from lb.cluster.redis_store import RedisStore

    def trip(key: str, seconds: float) -> None:
        node = registry.nodes.get(key)
        if node is not None:
            now = trio.current_time()
            node.breaker.trip_until(now, now + seconds)

    hooks = FleetHooks(
        caps=registry.fleet_caps,
        set_local_caps=registry.set_local_caps,
        export_table=lambda: orjson.dumps(scanner.node_table(registry)),
        import_table=lambda raw: scanner.load_table(registry, orjson.loads(raw), settings=settings),
        get_prefs=lambda: registry.prefs,
        set_prefs=registry.set_prefs,
        take_opened_breakers=lambda: registry.take_opened_breakers(trio.current_time()),
        trip_breaker=trip,
        demand=registry.demand,
        instances_changed=registry.share_rates,
    )
    return Fleet(
        RedisStore(address, settings.redis_prefix),
        hooks,
        instance_id=f"{socket.gethostname()}:{port}:{uuid.uuid4().hex[:6]}",
        sync_secs=settings.redis_sync_secs,
        table_ttl=max(30.0, 3 * settings.scan_interval),
    )


def build_gate(settings: Settings, registry: Registry, fleet: Fleet | None = None) -> Gate | None:
    """API keys, limits and spend: only with a master key or the operator's rate limits (else
    nothing on the request path). Keys and spend in SQLite; with a fleet, in its Redis, and
    key limits exact fleet-wide."""
    if not settings.master_key and not settings.rate_limits:
        return None
    from lb.policy.gate import Gate
    from lb.policy.prices import node_label_prices
    from lb.policy.store import SqliteStore

    def labels_of(key: str) -> Mapping[str, str] | None:
        node = registry.nodes.get(key)
        return None if node is None else node.config.labels

    prices = node_label_prices(labels_of)
    if fleet is None or settings.redis_address is None:
        store = SqliteStore(settings.data_dir if settings.master_key else ":memory:")
        return Gate(settings.master_key, store, prices,
                    rate_limits=settings.rate_limits)
    from lb.policy.fleet import FleetLimits, RedisKeyStore

    url, prefix = settings.redis_address, settings.redis_prefix
    limits = FleetLimits(url, prefix, lambda: len(fleet.instances), settings.request_timeout)
    return Gate(settings.master_key, RedisKeyStore(url, prefix), prices, fleet=limits,
                rate_limits=settings.rate_limits)


def build_router(
    settings: Settings,
    registry: Registry,
    server: HTTPServer,
    services: Mapping[str, ServiceStats] | None = None,
    scan: scanner.ScanState | None = None,
    fleet: Fleet | None = None,
    gate: Gate | None = None,
    worker: WorkerInfo | None = None,
) -> Router:
    async def change_prefs(prefs: Prefs) -> bool:
        registry.set_prefs(prefs)
        return fleet is not None and await fleet.prefs_changed(prefs)

    router = Router()
    counters = NodeCounters()
    routing_stats = RoutingStats()
    latency = LatencyTracker()
    # Every observer of proxied requests (metrics, access log, routing stats add theirs here).
    observers: list[RequestObserver] = [counters, routing_stats, latency, AccessLog()]
    if gate is not None:
        observers.append(gate)  # settles each request's key: tokens, parallel slot, spend
    if any(node.rate is not None for node in registry.nodes.values()):
        from lb.routing.node_rate import NodeRateObserver

        observers.append(NodeRateObserver(registry.nodes.get))  # nodes' tpm: real usage
    # The master key opens the admin endpoints and the views of the topology too.
    admin_key: admin.AdminKey = tuple(k for k in (settings.admin_key, settings.master_key) if k)
    if settings.metrics:
        request_metrics = Metrics(settings.sentinels)
        observers.append(request_metrics)
        metrics.add_routes(
            router, MetricsCollector(request_metrics, registry, litellm=settings.litellm_metrics),
            settings.metrics_key,
        )
    health.add_routes(router, lambda: server.draining)
    fleet_status = fleet.status if fleet else None
    if fleet is not None and gate is not None and gate.fleet is not None:
        limits = gate.fleet
        fleet_status = lambda: {**fleet.status(), **limits.status()}  # noqa: E731
    nodes.add_routes(
        router, registry, settings.min_healthy_nodes, fleet_status,
        admin_key=admin_key, model_grace=settings.model_grace, counters=counters,
        identify=gate.identify if gate is not None and gate.keys_on else None,
        aliases=settings.aliases, alias_only=settings.alias_only,
    )
    dispatcher = Dispatcher(registry, settings, observer=Observers(observers), latency=latency)
    debug.add_routes(
        router, registry, services or {}, scan or scanner.ScanState(), admin_key,
        dispatcher=dispatcher,
        worker=worker.describe() if worker else None,
    )
    admin.add_routes(
        router, admin_key=admin_key, get_prefs=lambda: registry.prefs,
        change_prefs=change_prefs, split_label=settings.traffic_split_label,
    )
    stats.add_routes(
        router, registry, routing_stats,
        strategy=strategies.parse_strategy(settings.routing_strategy).value,
        admin_key=admin_key, dispatcher=dispatcher,
    )
    proxy.add_routes(router, dispatcher, gate)
    anthropic.add_routes(router, dispatcher, gate)
    keys.add_routes(router, gate if gate is not None and gate.keys_on else None)
    return router


async def serve(
    settings: Settings,
    *,
    handle_signals: bool = True,
    listeners: list[trio.SocketListener] | None = None,
    worker: WorkerInfo | None = None,
    announce: Callable[[int], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run until drained by a signal (or cancelled); returns the process exit code.
    A worker of `--workers N` is given its listeners (opened by the parent) and its identity,
    and announces itself to the parent instead of printing."""
    raise_open_files_limit()
    if listeners is None:
        listeners = await open_listeners(settings)
    listen_port: int = listeners[0].socket.getsockname()[1]
    forced = False
    async with trio.open_nursery() as root:
        if settings.demo:
            demo_nodes = await start_demo_nodes(root)
            settings = attrs.evolve(settings, nodes=(*settings.nodes, *demo_nodes))
        registry = build_registry(settings)
        targets = scanner.targets_for(settings, listen_port)
        if targets:
            log.info("scanning %d address(es) for nodes: %s", len(targets), ", ".join(targets))
        scan = scanner.ScanState(targets=tuple(targets))
        services = {"scanner": ServiceStats()}
        fleet = None
        if settings.redis_address:
            fleet = build_fleet(settings, registry, settings.redis_address, listen_port)
            services["fleet"] = ServiceStats()
            await fleet.join()
            root.start_soon(supervise, "fleet", fleet.run, services["fleet"])
        # Every instance scans once at start; then only the leader does (or each, without Redis).
        after_scan = fleet.publish_table if fleet else None
        await scanner.scan_at_start(
            registry, targets, settings=settings, state=scan, after_scan=after_scan
        )
        root.start_soon(
            supervise, "scanner",
            lambda: scanner.scan_forever(
                registry, targets, settings=settings, state=scan,
                should_scan=(lambda: fleet.should_scan) if fleet else (lambda: True),
                after_scan=after_scan,
            ),
            services["scanner"],
        )
        gate = build_gate(settings, registry, fleet)
        if gate is not None:
            services["policy"] = ServiceStats()
            root.start_soon(supervise, "policy", gate.run, services["policy"])
        server = HTTPServer(
            Router(), server_limits(settings), CorsPolicy.from_setting(settings.cors_origins)
        )
        server.handler = build_router(
            settings, registry, server, services, scan, fleet, gate, worker
        )
        # Everything made so far (modules, settings, the registry) lives as long as lb does:
        # keep it out of the collector's full passes, which requests would otherwise pay for
        # (collected first, so no garbage is kept for good).
        gc.collect()
        gc.freeze()

        async def watch_signals() -> None:
            nonlocal forced
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    if not server.draining:
                        log.info(
                            "%s: draining (up to %.0fs)", signal.Signals(signum).name,
                            settings.drain_timeout,
                        )
                        server.drain(settings.drain_timeout)
                    else:
                        log.warning("second signal: exiting now")
                        forced = True
                        server.stop()

        if handle_signals:
            root.start_soon(watch_signals)
        root.start_soon(flush_logs_forever)
        async with trio.open_nursery() as front:
            port = await front.start(server.serve, listeners)
            if announce is not None:
                announce(port)
            else:
                print(f"lb listening on {listen_url(settings, port)}", flush=True)
            task_status.started(port)
        if gate is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await gate.flush()  # what finished reaches the store before lb exits
        if fleet is not None:
            await fleet.leave()  # the fleet need not wait for our heartbeat to expire
            fleet.store.close()
        root.cancel_scope.cancel()
    flush_logs()
    return FORCED_EXIT if forced else 0
