"""Discovery and health: the pure parts, `apply`, and the scanner under `lb serve` end to end."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from typing import Any

import httpx
import orjson
import pytest
import trio
from harness import CHAT, Running, start_lb, start_mock, start_mock_on
from hypothesis import given
from hypothesis import strategies as st

from lb.cluster import scanner
from lb.cluster.registry import Registry
from lb.cluster.scanner import (
    Observation,
    ProbeHealth,
    apply,
    parse_ollama_tags,
    parse_openai_models,
    scan_targets,
    targets_for,
)
from lb.config import DEFAULT_SCAN_PORTS, ConfigError, NodeConfig, Settings, load_settings
from lb.http.routes import Router
from lb.http.server import HTTPServer, ServerLimits
from lb.http.types import Request, Response

MODEL = "llama-3.1-8b"


# --- scan targets ----------------------------------------------------------------------------


def test_scan_targets_cross_hosts_with_ports() -> None:
    assert scan_targets(["gpu", "10.0.0.7:9000", "GPU", "[::1]"], [1, 2]) == [
        "http://gpu:1", "http://gpu:2", "http://10.0.0.7:9000", "http://[::1]:1",
        "http://[::1]:2",
    ]


def test_scan_targets_skip_own_addresses_and_duplicates() -> None:
    own = scanner.own_addresses("0.0.0.0", 8000)
    assert scan_targets(["localhost", "127.0.0.1", "localhost:8000", "box"], [8000, 1234], own) == [
        "http://localhost:1234", "http://127.0.0.1:1234", "http://box:8000", "http://box:1234",
    ]
    assert scan_targets(["box:8000"], [], {"Box:8000"}) == []


def test_scan_targets_reject_malformed_hosts() -> None:
    for bad in ("http://x", "x:notaport", "", "a b"):
        with pytest.raises(ValueError):
            scan_targets([bad], [1])


_hosts = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
_ports = st.integers(min_value=1, max_value=65535)
_entries = st.one_of(_hosts, st.tuples(_hosts, _ports).map(lambda hp: f"{hp[0]}:{hp[1]}"))


@given(st.lists(_entries, max_size=6), st.lists(_ports, max_size=5),
       st.sets(st.tuples(_hosts, _ports).map(lambda hp: f"{hp[0]}:{hp[1]}"), max_size=4))
def test_scan_targets_properties(entries: list[str], ports: list[int], own: set[str]) -> None:
    urls = scan_targets(entries, ports, own)
    keys = [url.removeprefix("http://") for url in urls]
    assert all(url.startswith("http://") for url in urls)
    assert len(set(keys)) == len(keys)  # no duplicates
    assert not set(keys) & own  # never lb itself
    expected = set()
    for entry in entries:
        if ":" in entry:
            expected.add(entry)  # a host:port entry carries its own port only
        else:
            expected.update(f"{entry}:{port}" for port in ports)
    assert set(keys) == expected - own
    assert [NodeConfig(url).key for url in urls] == keys


def test_scan_settings_parse_and_bad_values_name_the_setting() -> None:
    settings = load_settings(env={"SCAN_HOSTS": "GPU, box:9000,gpu,::1", "SCAN_PORTS": "1,2,1",
                                  "HEALTH_FAIL_THRESHOLD": "3"})
    assert settings.scan_hosts == ("gpu", "box:9000", "[::1]")
    assert (settings.scan_ports, settings.health_fail_threshold) == ((1, 2), 3)
    assert load_settings(env={}).scan_ports == DEFAULT_SCAN_PORTS == (1234, 11434, 8080, 8000)
    for env in ({"SCAN_HOSTS": "http://gpu:1"}, {"SCAN_HOSTS": "gpu:x"},
                {"SCAN_HOSTS": "gpu:70000"}, {"SCAN_PORTS": "0"}, {"SCAN_PORTS": "80,http"},
                {"HEALTH_FAIL_THRESHOLD": "0"}):
        ((name, value),) = env.items()
        with pytest.raises(ConfigError, match=f"{name}={value!r}"):
            load_settings(env=env)


def test_nothing_configured_scans_localhost() -> None:
    targets = targets_for(Settings(port=8000), 8000)
    assert targets == [f"http://localhost:{port}" for port in DEFAULT_SCAN_PORTS if port != 8000]
    # lb listening on another port scans 8000 too, but not its own port
    assert targets_for(Settings(port=0, scan_ports=(1234, 5555)), 5555) == [
        "http://localhost:1234"
    ]


def test_configured_nodes_turn_off_the_localhost_scan() -> None:
    settings = Settings(nodes=(NodeConfig("http://gpu:1234"),))
    assert targets_for(settings, 8000) == []
    both = Settings(nodes=(NodeConfig("http://gpu:1234"),), scan_hosts=("gpu", "box:1"),
                    scan_ports=(1234, 8080))
    # a configured node is probed as a node, not again as a target
    assert targets_for(both, 8000) == ["http://gpu:8080", "http://box:1"]


# --- answers and health ----------------------------------------------------------------------


def test_parse_answers() -> None:
    openai = {"object": "list", "data": [{"id": "a"}, {"id": "b"}, {"id": "a"}, {"x": 1}, 5]}
    assert parse_openai_models(openai) == ("a", "b")
    assert parse_openai_models({"data": []}) == ()
    tags = {"models": [{"name": "llama3:latest", "model": "llama3:latest"}, {"model": "qwen3"}]}
    assert parse_ollama_tags(tags) == ("llama3:latest", "qwen3")
    for bad in (None, [], {"models": []}, {"data": {}}, "text"):
        with pytest.raises(ValueError):
            parse_openai_models(bad)
    for bad in (None, {"data": []}, {"models": "x"}):
        with pytest.raises(ValueError):
            parse_ollama_tags(bad)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["data", "models", "id", "name", "model", "owned_by"]), inner, max_size=4
    ),
    max_leaves=12,
)


@given(_json)
def test_parsing_any_json_gives_names_or_value_error(payload: Any) -> None:
    for parse in (parse_openai_models, parse_ollama_tags):
        try:
            names = parse(payload)
        except ValueError:
            continue
        assert all(isinstance(name, str) and name for name in names)
        assert len(set(names)) == len(names)


def test_another_lb_answer_is_recognised() -> None:
    mine = {"data": [{"id": "m", "owned_by": "lb", "nodes": ["a:1"]}]}
    assert scanner.is_lb_answer(mine)
    assert not scanner.is_lb_answer({"data": [{"id": "m", "owned_by": "mock"}]})
    assert not scanner.is_lb_answer({"data": []})


@given(st.lists(st.booleans(), max_size=30), st.integers(min_value=1, max_value=5))
def test_health_follows_consecutive_failures(outcomes: list[bool], threshold: int) -> None:
    health = ProbeHealth()
    for ok in outcomes:
        before = health
        health = health.after(ok, threshold)
        if ok:  # one good probe is enough to come back
            assert health == ProbeHealth(healthy=True, failures=0)
        else:
            assert health.failures == before.failures + 1
            assert not health.healthy or before.healthy  # a failure never brings a node up
    trailing = len(outcomes) - len("".join("o" if ok else "x" for ok in outcomes).rstrip("x"))
    assert health.failures == trailing
    assert health.healthy == (any(outcomes) and trailing < threshold)


@given(
    st.builds(
        Observation,
        url=st.tuples(_hosts, _ports).map(lambda hp: f"http://{hp[0]}:{hp[1]}"),
        ok=st.booleans(),
        models=st.lists(st.text(max_size=8), max_size=4).map(tuple),
        error=st.text(max_size=10),
        api=st.sampled_from(["", "openai", "ollama", "lb"]),
    )
)
def test_observation_round_trips_through_a_dict(observation: Observation) -> None:
    assert Observation.from_dict(observation.to_dict()) == observation


def test_observation_from_a_bad_dict() -> None:
    for bad in ({}, {"url": "http://a:1"}, {"url": "http://a:1", "ok": "yes"},
                {"url": "http://a:1", "ok": True, "models": "m"},
                {"url": "http://a:1", "ok": True, "key": "b:2"}):
        with pytest.raises(ValueError):
            Observation.from_dict(bad)


# --- apply -----------------------------------------------------------------------------------


def _seen(url: str, ok: bool, *models: str, api: str = "openai") -> Observation:
    return Observation(url=url, ok=ok, models=models, api=api if ok else "",
                       error="" if ok else "refused")


def test_apply_discovers_answering_targets_only() -> None:
    settings = Settings(default_maxconn=5, maxconn_map={"b:2": 3}, breaker_threshold=7)
    registry = Registry()
    apply(registry, [_seen("http://a:1", False), _seen("http://b:2", True, "m"),
                     _seen("http://c:3", True, "n", api="ollama"),
                     _seen("http://d:4", True, "m", api="lb")], settings=settings)
    assert sorted(registry.nodes) == ["b:2", "c:3"]  # never answered, or another lb: no node
    b, c = registry.nodes["b:2"], registry.nodes["c:3"]
    assert (b.discovered, b.healthy, b.models, b.capacity) == (True, True, ("m",), 3)
    assert b.api == "openai"
    assert (c.capacity, c.api, c.breaker.threshold) == (5, "ollama", 7)
    assert [node.key for node in registry.serving("m")] == ["b:2"]


def test_apply_follows_health_and_models() -> None:
    settings = Settings(health_fail_threshold=2)
    registry = Registry()
    apply(registry, [_seen("http://b:2", True, "m")], settings=settings)
    node = registry.nodes["b:2"]
    apply(registry, [_seen("http://b:2", False)], settings=settings)
    assert node.healthy and node.probe_failures == 1 and registry.serving("m") == [node]
    apply(registry, [_seen("http://b:2", False)], settings=settings)
    assert not node.healthy and node.probe_failures == 2 and registry.serving("m") == []
    assert node.last_error == "probe: refused"
    assert "b:2" in registry.nodes  # it answered once: still a node, listed as down
    apply(registry, [_seen("http://b:2", True, "m", "n")], settings=settings)
    assert node.healthy and node.probe_failures == 0
    assert registry.models() == ["m", "n"]


def test_a_busy_node_misses_probes_without_going_down() -> None:
    """Passive health: failed probes of a node with requests in flight, or that answered one
    since about the last probe, do not count."""
    settings = Settings(health_fail_threshold=1, scan_interval=10, health_check_timeout=5)
    registry = Registry()
    apply(registry, [_seen("http://b:2", True, "m")], settings=settings, now=100)
    node = registry.nodes["b:2"]
    token = object()
    node.limiter.acquire_on_behalf_of_nowait(token)  # a request in flight
    apply(registry, [_seen("http://b:2", False)], settings=settings, now=110)
    assert node.healthy and node.probe_failures == 0
    node.limiter.release_on_behalf_of(token)
    node.last_answer = 112  # it answered a request since the last probe
    apply(registry, [_seen("http://b:2", False)], settings=settings, now=120)
    assert node.healthy
    apply(registry, [_seen("http://b:2", False)], settings=settings, now=140)  # idle, silent
    assert not node.healthy and registry.serving("m") == []


def test_models_of_a_node_that_went_down_are_gone_not_unknown() -> None:
    settings = Settings(health_fail_threshold=1)
    registry = Registry()
    apply(registry, [_seen("http://b:2", True, "m", "n")], settings=settings, now=0)
    apply(registry, [_seen("http://b:2", True, "m")], settings=settings, now=1)
    assert registry.gone_models(now=1, grace=600) == {}  # unloaded on a healthy node: gone
    apply(registry, [_seen("http://b:2", False)], settings=settings, now=2)
    assert set(registry.gone_models(now=2, grace=600)) == {"m"}  # its node went down
    assert registry.gone_models(now=700, grace=600) == {}  # the grace ran out
    apply(registry, [_seen("http://b:2", False)], settings=settings, now=701)
    apply(registry, [_seen("http://b:2", True, "m")], settings=settings, now=702)
    assert registry.models() == ["m"] and registry.gone_models(now=702, grace=600) == {}


def test_apply_keeps_configured_nodes_that_never_answer() -> None:
    settings = Settings(nodes=(NodeConfig("http://a:1/prefix"),))
    from lb.app import build_registry

    registry = build_registry(settings)
    apply(registry, [_seen("http://a:1/prefix", False)] * 3, settings=settings)
    node = registry.nodes["a:1"]
    assert not node.discovered and not node.healthy and node.probe_failures == 3
    # another lb as a configured node is fine: chaining lbs on purpose
    apply(registry, [_seen("http://a:1/prefix", True, "m", api="lb")], settings=settings)
    assert node.healthy and node.api == "lb"


def test_node_table_round_trips_into_another_registry() -> None:
    settings = Settings(nodes=(NodeConfig("http://a:1"),), maxconn_map={"b:2": 4})
    from lb.app import build_registry

    leader = build_registry(settings)
    apply(leader, [_seen("http://a:1", True, "m"), _seen("http://b:2", True, "m", "n"),
                   _seen("http://c:3", False)], settings=settings)
    apply(leader, [_seen("http://b:2", False)], settings=settings)
    table = scanner.node_table(leader)
    assert [entry["key"] for entry in table] == ["a:1", "b:2"]
    follower = build_registry(settings)
    scanner.load_table(follower, orjson.loads(orjson.dumps(table)), settings=settings)
    assert scanner.node_table(follower) == table
    assert follower.nodes["b:2"].capacity == 4 and follower.nodes["b:2"].discovered
    assert [node.key for node in follower.serving("n")] == ["b:2"]
    with pytest.raises(ValueError):
        scanner.load_table(follower, [{"url": "http://d:4", "healthy": "yes"}], settings=settings)
    assert "d:4" not in follower.nodes


async def test_should_scan_and_after_scan_hooks(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        settings = Settings(scan_interval=0.02)
        registry = Registry()
        state = scanner.ScanState()
        scanning = False
        published: list[list[dict[str, Any]]] = []

        async def publish() -> None:
            published.append(scanner.node_table(registry))

        nursery.start_soon(lambda: scanner.scan_forever(
            registry, [node.url], settings=settings, should_scan=lambda: scanning,
            state=state, after_scan=publish,
        ))
        while state.skipped < 3:
            await trio.sleep(0.01)
        assert state.scans == 0 and registry.nodes == {} and await node.stats() == {
            **await node.stats(), "requests": 0
        }
        scanning = True
        while not published:
            await trio.sleep(0.01)
        assert [entry["models"] for entry in published[0]] == [[MODEL]]
        assert state.scans >= 1


# --- end to end ------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_ollama_only(nursery: trio.Nursery, models: tuple[str, ...]) -> int:
    """A server that answers only Ollama's `GET /api/tags` (404 on /v1/models)."""
    router = Router()

    async def tags(request: Request) -> Response:
        return Response.json({"models": [{"name": m, "model": m, "size": 1} for m in models]})

    router.add("GET", "/api/tags", tags)
    server = HTTPServer(router, ServerLimits())
    port: int = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
    return port


async def get(lb: Running, path: str) -> Any:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{lb.url}{path}")
        assert answer.status_code == 200, answer.text
        return answer.json()


async def models_of(lb: Running) -> list[str]:
    return [model["id"] for model in (await get(lb, "/v1/models"))["data"]]


async def nodes_of(lb: Running) -> dict[str, dict[str, Any]]:
    return {node["node"]: node for node in (await get(lb, "/v1/nodes"))["nodes"]}


async def test_scanner_finds_openai_and_ollama_nodes(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        a = await start_mock(nursery, models=(MODEL, "qwen3-8b"))
        b = await start_mock(nursery, models=(MODEL, "gemma3-270m"))
        ollama = await start_ollama_only(nursery, ("llama3:latest",))
        nobody = closed_port()
        lb = await start_lb(
            nursery, [], scan_hosts=("127.0.0.1",),
            scan_ports=(a.port, b.port, ollama, nobody), scan_interval=0.1,
            default_maxconn=5, maxconn_map={a.key: 2},
        )
        # found by the first scan, before lb accepted its first connection
        assert await models_of(lb) == sorted({MODEL, "qwen3-8b", "gemma3-270m", "llama3:latest"})
        nodes = await nodes_of(lb)
        assert sorted(nodes) == sorted([a.key, b.key, f"127.0.0.1:{ollama}"])  # not `nobody`
        assert all(node["discovered"] and node["healthy"] for node in nodes.values())
        assert nodes[f"127.0.0.1:{ollama}"]["api"] == "ollama"
        assert (nodes[a.key]["maxconn"], nodes[b.key]["maxconn"]) == (2, 5)
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{lb.url}/v1/chat/completions",
                                       json={"model": "gemma3-270m", **CHAT})
        assert answer.status_code == 200 and answer.headers["x-routed-node"] == b.key
        services = await get(lb, "/v1/debug/services")
        assert services["services"]["scanner"]["crashes"] == 0
        assert f"http://127.0.0.1:{nobody}" in services["scanner"]["targets"]


async def test_another_lb_is_not_discovered(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        first = await start_lb(nursery, [node])
        second = await start_lb(nursery, [], scan_hosts=("127.0.0.1",),
                                scan_ports=(first.port, node.port), scan_interval=0.1)
        assert list(await nodes_of(second)) == [node.key]
        scans = (await get(second, "/v1/debug/services"))["scanner"]["scans"]
        while (await get(second, "/v1/debug/services"))["scanner"]["scans"] < scans + 2:
            await trio.sleep(0.05)
        assert list(await nodes_of(second)) == [node.key]


async def test_node_leaves_after_threshold_and_returns_on_first_good_probe(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(15):
        keep = await start_mock(nursery, models=(MODEL,))
        node = await start_mock(nursery, models=(MODEL, "only-here"))
        lb = await start_lb(nursery, [], scan_hosts=("127.0.0.1",),
                            scan_ports=(keep.port, node.port), scan_interval=0.1,
                            health_fail_threshold=2)
        assert "only-here" in await models_of(lb)
        node.stop()
        while True:
            seen = (await nodes_of(lb))[node.key]
            # healthy exactly while fewer than 2 probes in a row failed
            assert seen["healthy"] == (seen["probe_failures"] < 2), seen
            if not seen["healthy"]:
                break
            await trio.sleep(0.02)
        assert seen["discovered"] and seen["last_error"].startswith("probe: ")
        async with httpx.AsyncClient() as client:
            listed = (await client.get(f"{lb.url}/v1/models/only-here")).json()
            assert listed["available"] is False  # listed, unavailable, for MODEL_GRACE_SECS
            answer = await client.post(f"{lb.url}/v1/chat/completions",
                                       json={"model": "only-here", **CHAT})
            # No healthy node serves it right now: 503 with Retry-After, which SDKs retry.
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "model_unavailable"
            assert answer.headers["retry-after"] == "1"
            for _ in range(4):  # and the shared model goes to the node that is up
                answer = await client.post(f"{lb.url}/v1/chat/completions",
                                           json={"model": MODEL, **CHAT})
                assert answer.headers["x-routed-node"] == keep.key
        again = await start_mock_on(nursery, node.port, models=(MODEL, "only-here"))
        while not (await nodes_of(lb))[node.key]["healthy"]:
            await trio.sleep(0.02)
        seen = (await nodes_of(lb))[node.key]
        assert seen["probe_failures"] == 0
        assert "only-here" in await models_of(lb)
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{lb.url}/v1/chat/completions",
                                       json={"model": "only-here", **CHAT})
        assert answer.status_code == 200 and answer.headers["x-routed-node"] == again.key


async def test_model_list_changes_without_restart(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [], scan_hosts=(f"127.0.0.1:{node.port}",),
                            scan_interval=0.1)
        assert await models_of(lb) == [MODEL]
        node.node.models = ("qwen3-8b", "nomic-embed-text")
        while await models_of(lb) != ["nomic-embed-text", "qwen3-8b"]:
            await trio.sleep(0.02)
        assert (await nodes_of(lb))[node.key]["models"] == ["qwen3-8b", "nomic-embed-text"]


async def test_scanner_crash_is_logged_counted_and_restarted(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(15):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [], scan_hosts=(f"127.0.0.1:{node.port}",),
                            scan_interval=0.1)
        real = scanner.scan_once
        calls = 0

        async def crash_once(*args: Any, **kwargs: Any) -> list[Observation]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("injected scanner failure")
            return await real(*args, **kwargs)

        monkeypatch.setattr(scanner, "scan_once", crash_once)
        while (await get(lb, "/v1/debug/services"))["services"]["scanner"]["crashes"] == 0:
            await trio.sleep(0.02)
        services = await get(lb, "/v1/debug/services")
        assert services["services"]["scanner"] == {
            "crashes": 1, "last_error": "RuntimeError: injected scanner failure"
        }
        crashed = [r for r in caplog.records if r.name == "lb.supervise"]
        assert crashed and crashed[0].exc_info is not None  # logged with its traceback
        assert crashed[0].levelno == logging.ERROR
        # the restarted scanner still works: a model change shows up
        node.node.models = ("after-the-crash",)
        while await models_of(lb) != ["after-the-crash"]:
            await trio.sleep(0.02)
        assert calls >= 2
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{lb.url}/v1/chat/completions",
                                       json={"model": "after-the-crash", **CHAT})
        assert answer.status_code == 200
        assert (await get(lb, "/v1/debug/services"))["services"]["scanner"]["crashes"] == 1


async def test_lb_serve_alone_scans_localhost(nursery: trio.Nursery) -> None:
    """`lb serve` with nothing configured finds a node on localhost (on a SCAN_PORTS port)."""
    with trio.fail_after(30):
        node = await start_mock(nursery, models=(MODEL,))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        drop = ("LB_NODES", "LB_CONFIG", "SCAN_HOSTS", "SCAN_PORTS")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(SCAN_PORTS=f"{node.port},{port}", SCAN_INTERVAL="0.2")
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "lb.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        try:
            assert process.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                data = await process.stdout.receive_some(1024)
                assert data, "lb exited before listening"
                line += data
            assert line.decode().strip() == f"lb listening on http://127.0.0.1:{port}"
            lb = Running(port, trio.CancelScope())
            nodes = await nodes_of(lb)
            # found under localhost; lb's own port, though in SCAN_PORTS, is not a node
            assert list(nodes) == [f"localhost:{node.port}"]
            assert nodes[f"localhost:{node.port}"]["discovered"] is True
            assert await models_of(lb) == [MODEL]
        finally:
            process.kill()
            await process.wait()
