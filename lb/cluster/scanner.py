"""Discovery and health: finds nodes on SCAN_HOSTS x SCAN_PORTS and follows every node's models
and health, probing each one every SCAN_INTERVAL seconds.

The module is cut so that probing and applying are separate steps (a cluster leader can probe
and publish what it saw; every instance applies it):

- pure: `scan_targets` (which URLs to try), `parse_openai_models` / `parse_ollama_tags` (the two
  answer shapes), `ProbeHealth` (consecutive failures -> healthy or not);
- I/O: `probe` (one URL: `GET /v1/models`, else Ollama's `GET /api/tags`) and `scan_once` (many
  URLs, concurrently, bounded by a limiter); an `Observation` is what one probe saw, and it
  round-trips through a plain dict;
- `apply` (synchronous): observations -> the registry: a target that answers becomes a node, a
  node that fails HEALTH_FAIL_THRESHOLD probes in a row leaves routing, one good probe brings it
  back, model lists follow the node's answer;
- `scan_forever`: the loop that `lb serve` runs under `lb.supervise`.

Probes go through httpx: this is not the hot path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import attrs
import httpx
import trio

from lb.cluster.node import Node
from lb.cluster.registry import Registry
from lb.config import NodeConfig, Settings, host_port

log = logging.getLogger("lb.scanner")

MAX_CONCURRENT_PROBES = 32
DEFAULT_HOST = "localhost"  # scanned when nothing at all is configured

# What answered a good probe.
OPENAI = "openai"  # GET /v1/models
OLLAMA = "ollama"  # GET /api/tags
LB = "lb"  # GET /v1/models, from another lb: never discovered (two lbs would loop)
LB_OWNER = "lb"  # `owned_by` of every model entry an lb lists (lb/api/nodes.py)


# --- pure parts ------------------------------------------------------------------------------


def _key(host: str, port: int) -> str:
    return f"{host}:{port}"


def _own_key(entry: str) -> str | None:
    try:
        host, port = host_port(entry)
    except ValueError:
        return None
    return None if port is None else _key(host, port)


def scan_targets(
    hosts: Iterable[str], ports: Iterable[int], own: Collection[str] = frozenset()
) -> list[str]:
    """Every `http://host:port` to probe, in order, without duplicates or lb's own addresses.

    A `host` entry is tried on each of `ports`; a `host:port` entry only on its own port. `own`
    holds `host:port` strings to skip. Raises ValueError for a malformed host entry.
    """
    ports = tuple(ports)
    skip = {key for key in (_own_key(entry) for entry in own) if key is not None}
    seen: set[str] = set()
    urls: list[str] = []
    for entry in hosts:
        host, port = host_port(entry)
        for number in ports if port is None else (port,):
            key = _key(host, number)
            if key in skip or key in seen:
                continue
            seen.add(key)
            urls.append(f"http://{key}")
    return urls


def own_addresses(host: str, port: int) -> set[str]:
    """The `host:port` names under which this lb may find itself."""
    own = {_key("127.0.0.1", port), _key("localhost", port), _key("[::1]", port)}
    try:
        listen_host, _ = host_port(host)
        own.add(_key(listen_host, port))
    except ValueError:
        pass
    return own


def scan_hosts_for(settings: Settings) -> tuple[str, ...]:
    """SCAN_HOSTS; with no nodes configured and no SCAN_HOSTS, this machine."""
    if settings.scan_hosts:
        return settings.scan_hosts
    return () if settings.nodes else (DEFAULT_HOST,)


def targets_for(settings: Settings, listen_port: int) -> list[str]:
    """The scan targets of `lb serve` listening on `listen_port`; configured nodes excluded
    (they are probed anyway)."""
    configured = {node.key for node in settings.all_nodes()}
    targets = scan_targets(
        scan_hosts_for(settings), settings.scan_ports, own_addresses(settings.host, listen_port)
    )
    return [url for url in targets if NodeConfig(url).key not in configured]


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def parse_openai_models(payload: Any) -> tuple[str, ...]:
    """The model ids of an OpenAI `GET /v1/models` answer; ValueError if it is not one."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ValueError("/v1/models answer has no 'data' list")
    return _unique(
        item["id"] for item in data
        if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]
    )


def is_lb_answer(payload: Any) -> bool:
    """Whether a `/v1/models` answer comes from an lb (every entry owned by lb, with nodes)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    return bool(data) and isinstance(data, list) and all(
        isinstance(item, dict) and item.get("owned_by") == LB_OWNER and "nodes" in item
        for item in data
    )


def parse_ollama_tags(payload: Any) -> tuple[str, ...]:
    """The model names of an Ollama `GET /api/tags` answer; ValueError if it is not one."""
    models = payload.get("models") if isinstance(payload, dict) else None
    if not isinstance(models, list):
        raise ValueError("/api/tags answer has no 'models' list")
    names = []
    for item in models:
        if not isinstance(item, dict):
            continue
        name = item.get("name") or item.get("model")
        if isinstance(name, str) and name:
            names.append(name)
    return _unique(names)


@attrs.frozen
class ProbeHealth:
    """A node's health as probes see it: `threshold` failed probes in a row mark it down, one
    good probe brings it back. A node never seen answering is not healthy."""

    healthy: bool = False
    failures: int = 0  # failed probes in a row

    def after(self, ok: bool, threshold: int) -> ProbeHealth:
        if ok:
            return ProbeHealth(healthy=True, failures=0)
        failures = self.failures + 1
        return ProbeHealth(healthy=self.healthy and failures < threshold, failures=failures)


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _key_of(observation: Observation) -> str:
    return NodeConfig(observation.url).key


@attrs.frozen(kw_only=True)
class Observation:
    """What one probe of one URL saw."""

    url: str  # http://host:port[/prefix]
    ok: bool
    models: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    error: str = ""  # why the probe failed
    api: str = ""  # OPENAI, OLLAMA or LB when ok
    key: str = attrs.field(default=attrs.Factory(_key_of, takes_self=True))  # host:port

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url, "key": self.key, "ok": self.ok, "models": list(self.models),
            "error": self.error, "api": self.api,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Observation:
        """The inverse of `to_dict`; ValueError if `data` is not one."""
        url, ok, models = data.get("url"), data.get("ok"), data.get("models", [])
        error, api = data.get("error", ""), data.get("api", "")
        if not isinstance(url, str) or not isinstance(ok, bool):
            raise ValueError("an observation needs a url (text) and ok (true or false)")
        if not isinstance(models, list | tuple) or not all(isinstance(m, str) for m in models):
            raise ValueError("an observation's models must be a list of text")
        if not isinstance(error, str) or not isinstance(api, str):
            raise ValueError("an observation's error and api must be text")
        observation = cls(url=url, ok=ok, models=models, error=error, api=api)
        key = data.get("key", observation.key)
        if key != observation.key:
            raise ValueError(f"an observation's key {key!r} does not match its url {url!r}")
        return observation


# --- probing ---------------------------------------------------------------------------------

_NO_ANSWER = (httpx.HTTPError, httpx.InvalidURL, OSError)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def probe(client: httpx.AsyncClient, url: str) -> Observation:
    """`GET {url}/v1/models`; if that answers but not with a model list, Ollama's `/api/tags`.
    A target that does not answer at all is not asked twice."""
    try:
        response = await client.get(f"{url}/v1/models")
    except _NO_ANSWER as exc:
        return Observation(url=url, ok=False, error=f"/v1/models: {_describe(exc)}")
    try:
        if response.is_success:
            payload = response.json()
            models = parse_openai_models(payload)
            api = LB if is_lb_answer(payload) else OPENAI
            return Observation(url=url, ok=True, models=models, api=api)
        first = f"/v1/models: HTTP {response.status_code}"
    except ValueError as exc:
        first = f"/v1/models: {exc}"
    try:
        response = await client.get(f"{url}/api/tags")
        if response.is_success:
            models = parse_ollama_tags(response.json())
            return Observation(url=url, ok=True, models=models, api=OLLAMA)
        second = f"/api/tags: HTTP {response.status_code}"
    except (*_NO_ANSWER, ValueError) as exc:
        second = f"/api/tags: {_describe(exc)}"
    return Observation(url=url, ok=False, error=f"{first}; {second}")


async def scan_once(
    client: httpx.AsyncClient,
    urls: Sequence[str],
    limiter: trio.CapacityLimiter,
    *,
    probe_timeout: float | None = None,
) -> list[Observation]:
    """Probe every URL concurrently, at most `limiter`'s tokens at once; one observation per URL,
    in order. `probe_timeout` bounds each whole probe (both of its requests)."""
    results: list[Observation | None] = [None] * len(urls)

    async def one(index: int, url: str) -> None:
        async with limiter:
            with trio.move_on_after(math.inf if probe_timeout is None else probe_timeout):
                results[index] = await probe(client, url)
                return
            results[index] = Observation(url=url, ok=False, error="probe timed out")

    async with trio.open_nursery() as nursery:
        for index, url in enumerate(urls):
            nursery.start_soon(one, index, url)
    return [result for result in results if result is not None]


# --- applying --------------------------------------------------------------------------------


def apply(
    registry: Registry, observations: Iterable[Observation], *, settings: Settings,
    now: float | None = None,
) -> None:
    """Observations -> the registry's nodes, their models and their health.

    Passive health: a failed probe of a node that has requests in flight, or answered one since
    about the last probe, is not counted — single-slot servers (llama-cpp-python, LM Studio)
    leave `/v1/models` unanswered while they generate, and a busy node is not a dead one."""
    threshold = settings.health_fail_threshold
    if now is None:
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio (tools, tests): no request can be in flight
            now = 0.0
    recently = now - settings.scan_interval - settings.health_check_timeout
    for seen in observations:
        node = registry.nodes.get(seen.key)
        if node is None:
            if not seen.ok:
                continue  # a target that never answered is not a node
            if seen.api == LB:
                log.debug("%s is another lb; not adding it as a node", seen.key)
                continue
            node = Node.from_settings(NodeConfig(url=seen.url), settings)
            node.discovered = True
            registry.add(node)
            log.info("discovered node %s (%s)", node.key, seen.api)
        elif node.discovered and seen.api == LB:
            registry.remove(node.key)
            log.info("discovered node %s is another lb; removed", node.key)
            continue
        was_healthy = node.healthy
        if not seen.ok and was_healthy and (node.inflight or node.last_answer > recently):
            log.debug("node %s missed a probe while serving requests: %s", node.key, seen.error)
            continue
        health = ProbeHealth(node.healthy, node.probe_failures).after(seen.ok, threshold)
        node.probe_failures = health.failures
        if seen.ok:
            node.api = seen.api
            if was_healthy and seen.models != node.models:
                log.info("node %s now serves %s", node.key, ", ".join(seen.models) or "nothing")
            registry.update(node, models=seen.models, healthy=True)
        else:
            node.last_error = f"probe: {seen.error}"
            registry.update(node, healthy=health.healthy)
        if was_healthy and not node.healthy:
            log.warning("node %s is down after %d failed probe(s): %s",
                        node.key, health.failures, seen.error)
        elif node.healthy and not was_healthy:
            log.info("node %s is up with %d model(s): %s",
                     node.key, len(node.models), ", ".join(node.models))


# --- the node table: what a scanning instance shares with the others -------------------------


def node_table(registry: Registry) -> list[dict[str, Any]]:
    """Every node's scanned state, as plain data (JSON-ready), in registry order."""
    return [
        {
            "url": node.url, "key": node.key, "healthy": node.healthy,
            "models": list(node.models), "probe_failures": node.probe_failures,
            "api": node.api, "last_error": node.last_error, "discovered": node.discovered,
        }
        for node in registry.nodes.values()
        if not node.config.models  # fixed lists are every instance's own configuration
    ]


def _table_entry(entry: Mapping[str, Any]) -> tuple[str, bool, tuple[str, ...], int, str, str]:
    url, healthy, models = entry.get("url"), entry.get("healthy"), entry.get("models")
    failures = entry.get("probe_failures", 0)
    api, error = entry.get("api", ""), entry.get("last_error", "")
    if not isinstance(url, str) or not isinstance(healthy, bool):
        raise ValueError("a node table entry needs a url (text) and healthy (true or false)")
    if not isinstance(models, list | tuple) or not all(isinstance(m, str) for m in models):
        raise ValueError("a node table entry's models must be a list of text")
    if not isinstance(failures, int) or isinstance(failures, bool) or failures < 0:
        raise ValueError("a node table entry's probe_failures must be a whole number >= 0")
    if not isinstance(api, str) or not isinstance(error, str):
        raise ValueError("a node table entry's api and last_error must be text")
    return url, healthy, tuple(models), failures, api, error


def load_table(
    registry: Registry, table: Iterable[Mapping[str, Any]], *, settings: Settings
) -> None:
    """Take another instance's `node_table` as this one's: nodes it discovered are added, and
    every listed node gets its models and health (no probe here). Nodes it does not list are
    left alone. ValueError (before any change) if an entry is malformed."""
    entries = [_table_entry(entry) for entry in table]
    for url, healthy, models, failures, api, error in entries:
        key = NodeConfig(url).key
        node = registry.nodes.get(key)
        if node is None:
            node = Node.from_settings(NodeConfig(url=url), settings)
            node.discovered = True
            registry.add(node)
            log.info("node %s learnt from the scanning instance", key)
        elif node.config.models:
            continue
        node.probe_failures, node.api, node.last_error = failures, api, error
        registry.update(node, models=models, healthy=healthy)


# --- the loop --------------------------------------------------------------------------------


@attrs.define
class ScanState:
    """What the scanner is doing, for `/v1/debug/services`."""

    targets: tuple[str, ...] = ()
    scans: int = 0  # rounds probed and applied
    skipped: int = 0  # rounds skipped because should_scan() said no

    def describe(self) -> dict[str, object]:
        return {"targets": list(self.targets), "scans": self.scans, "skipped": self.skipped}


def probe_urls(registry: Registry, targets: Iterable[str]) -> list[str]:
    """Every node's URL, then the scan targets that are not nodes yet."""
    urls = [node.url for node in registry.nodes.values() if not node.config.models]
    return urls + [url for url in targets if NodeConfig(url).key not in registry.nodes]


def _client(settings: Settings) -> httpx.AsyncClient:
    # trust_env=False: nodes are reached directly, as the request path reaches them.
    return httpx.AsyncClient(timeout=settings.health_check_timeout or None, trust_env=False)


def _probe_bound(settings: Settings) -> float | None:
    # A probe is at most two requests, each with HEALTH_CHECK_TIMEOUT_SECONDS per operation.
    return 2 * settings.health_check_timeout + 1 if settings.health_check_timeout else None


AfterScan = Callable[[], Awaitable[None]]


async def _scan_round(
    registry: Registry, targets: Sequence[str], client: httpx.AsyncClient,
    limiter: trio.CapacityLimiter, settings: Settings, state: ScanState,
    after_scan: AfterScan | None,
) -> None:
    urls = probe_urls(registry, targets)
    observations = await scan_once(client, urls, limiter, probe_timeout=_probe_bound(settings))
    apply(registry, observations, settings=settings)
    state.scans += 1
    if after_scan is not None:
        await after_scan()


async def scan_at_start(
    registry: Registry,
    targets: Sequence[str],
    *,
    settings: Settings,
    should_scan: Callable[[], bool] = lambda: True,
    state: ScanState | None = None,
    after_scan: AfterScan | None = None,
) -> None:
    """One round before the server listens, so that the first request finds the nodes."""
    state = state if state is not None else ScanState(tuple(targets))
    if not should_scan():
        state.skipped += 1
        return
    async with _client(settings) as client:
        limiter = trio.CapacityLimiter(MAX_CONCURRENT_PROBES)
        await _scan_round(registry, targets, client, limiter, settings, state, after_scan)


async def scan_forever(
    registry: Registry,
    targets: Sequence[str],
    *,
    settings: Settings,
    should_scan: Callable[[], bool] = lambda: True,
    state: ScanState | None = None,
    after_scan: AfterScan | None = None,
) -> None:
    """Every SCAN_INTERVAL: if `should_scan()`, probe every node and target, apply what was
    seen, then await `after_scan()` (e.g. to publish `node_table`)."""
    state = state if state is not None else ScanState(tuple(targets))
    limiter = trio.CapacityLimiter(MAX_CONCURRENT_PROBES)
    async with _client(settings) as client:
        while True:
            await trio.sleep(settings.scan_interval)
            if not should_scan():
                state.skipped += 1
                continue
            await _scan_round(registry, targets, client, limiter, settings, state, after_scan)
