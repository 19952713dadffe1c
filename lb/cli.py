"""The `lb` command line: builds settings and calls trio.run; no logic of its own."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import click
import trio

from lb.config import ConfigError, load_settings
from lb.obs.logs import configure_logging


def _fail(message: str) -> None:
    click.echo(f"lb: {message}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(package_name="lb")
def main() -> None:
    """lb: one OpenAI-compatible endpoint in front of many LLM nodes."""


@main.command()
@click.option("--host", default=None, help="Address to listen on [env HOST; 0.0.0.0]")
@click.option("--port", default=None, help="Port [env LOAD_BALANCER_PORT; 8000]")
@click.option(
    "--node", "nodes", multiple=True, help="Upstream node URL (repeatable) [env LB_NODES]"
)
@click.option("--config", "config_file", default=None, help="YAML settings file [env LB_CONFIG]")
@click.option("--demo", is_flag=True, default=None, help="Start two mock nodes in this process")
@click.option("--log-level", default=None, help="debug, info, warning, error [env LB_LOG_LEVEL]")
@click.option("--log-format", default=None, help="text or json [env LB_LOG_FORMAT; text]")
@click.option(
    "--workers", default=None,
    help="Worker processes sharing the port; auto = one per core [env LB_WORKERS; 1]",
)
def serve(
    host: str | None, port: str | None, nodes: tuple[str, ...], config_file: str | None,
    demo: bool | None, log_level: str | None, log_format: str | None, workers: str | None,
) -> None:
    """Run the load balancer."""
    flags: dict[str, Any] = {
        "host": host, "port": port, "nodes": list(nodes) or None, "demo": demo,
        "log_level": log_level, "log_format": log_format, "workers": workers,
    }
    try:
        settings = load_settings(
            config_file=config_file or os.environ.get("LB_CONFIG"), env=os.environ, flags=flags
        )
    except ConfigError as exc:
        _fail(str(exc))
    configure_logging(settings.log_level, settings.log_format)
    if settings.catalogue is not None:
        from lb.catalogue import log_warnings

        log_warnings(settings.catalogue)
    if settings.workers > 1:
        from lb.workers import run_parent as run_server
    else:
        from lb.app import serve as run_server

    try:
        code = trio.run(run_server, settings)
    except ConfigError as exc:
        _fail(str(exc))
    sys.exit(code)


@main.command("serve-worker", hidden=True)
@click.option("--index", type=int, required=True)
@click.option("--count", type=int, required=True)
@click.option("--restarts", type=int, default=0)
@click.option("--fds", required=True, help="Inherited listening sockets, comma separated")
@click.option("--ready-fd", type=int, required=True)
def serve_worker(index: int, count: int, restarts: int, fds: str, ready_fd: int) -> None:
    """One worker of `lb serve --workers N`, started by its parent (settings on stdin)."""
    from lb.workers import WorkerInfo, read_settings, run_worker

    settings = read_settings()
    configure_logging(settings.log_level, settings.log_format)
    info = WorkerInfo(index=index, count=count, restarts=restarts)
    sockets = [int(fd) for fd in fds.split(",")]
    sys.exit(trio.run(run_worker, settings, info, sockets, ready_fd))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, type=int, help="0 picks a free port")
@click.option("--model", "models", multiple=True, help="Model id to serve (repeatable)")
@click.option("--ttft-ms", default=0.0, type=float, show_default=True)
@click.option("--itl-ms", default=0.0, type=float, show_default=True)
@click.option("--tokens", default=8, type=int, show_default=True)
@click.option("--embedding-dim", default=64, type=int, show_default=True)
@click.option("--fault", default="", help="Node-wide fault, e.g. 'status=503,rate=0.2'")
@click.option("--name", default="mock", show_default=True)
@click.option(
    "--busy-probes", is_flag=True,
    help="GET /v1/models and /api/tags wait while an answer is being generated "
    "(llama-cpp-python's single worker)",
)
@click.option(
    "--strict-request-id", is_flag=True,
    help="Answer a POST whose x-request-id is not a UUID with an empty 400 (llama-cpp-python)",
)
@click.option(
    "--ignore-max-completion-tokens", is_flag=True,
    help="Only max_tokens limits an answer, not max_completion_tokens (llama-cpp-python)",
)
@click.option(
    "--prefix-cache", is_flag=True,
    help="Simulate a prefix cache: TTFT grows with the prompt's bytes after its longest "
    "cached prefix",
)
@click.option(
    "--prefill-ms-per-kb", default=20.0, type=click.FloatRange(min=0), show_default=True,
    help="With --prefix-cache: time to process 1 KiB of uncached prompt",
)
@click.option(
    "--cache-entries", default=10_000, type=click.IntRange(min=1), show_default=True,
    help="With --prefix-cache: LRU size, in 256-byte blocks",
)
@click.option(
    "--ttft-per-inflight-ms", default=0.0, type=click.FloatRange(min=0), show_default=True,
    help="TTFT grows by this much per other request in flight on the node",
)
@click.option(
    "--dialect", type=click.Choice(["openai", "anthropic"]), default="openai",
    show_default=True, help="The API the node plays (anthropic: POST /v1/messages)",
)
@click.option("--api-key", default="", help="Require this key (Bearer, or x-api-key)")
@click.option(
    "--processes", default=1, type=click.IntRange(min=1), show_default=True,
    help="Serve from this many processes on the port (SO_REUSEPORT): a node faster than one "
    "core; each process keeps its own /mock/stats, recorded requests and runtime fault",
)
def mock(
    host: str, port: int, models: tuple[str, ...], ttft_ms: float, itl_ms: float, tokens: int,
    embedding_dim: int, fault: str, name: str, busy_probes: bool, strict_request_id: bool,
    ignore_max_completion_tokens: bool, prefix_cache: bool, prefill_ms_per_kb: float,
    cache_entries: int, ttft_per_inflight_ms: float, dialect: str, api_key: str, processes: int,
) -> None:
    """Run a mock LLM node, OpenAI-compatible or Anthropic (for tests, benchmarks, demos)."""
    from lb.testing import MockNode
    from lb.testing.faults import parse_fault

    if fault:
        try:
            parse_fault(fault)
        except ValueError as exc:
            _fail(f"--fault={fault!r}: {exc}")

    def make_node() -> MockNode:
        return MockNode(
            models=models or ("mock-model",), ttft_ms=ttft_ms, itl_ms=itl_ms, tokens=tokens,
            embedding_dim=embedding_dim, fault=fault, name=name, busy_probes=busy_probes,
            strict_request_id=strict_request_id,
            honours_max_completion_tokens=not ignore_max_completion_tokens,
            prefix_cache=prefix_cache, prefill_ms_per_kb=prefill_ms_per_kb,
            cache_entries=cache_entries, ttft_per_inflight_ms=ttft_per_inflight_ms,
            dialect=dialect, api_key=api_key,
        )

    def listening(bound: int) -> None:
        print(f"lb mock listening on http://{host}:{bound}", flush=True)

    if processes > 1:
        from lb.testing import processes as many

        try:
            sockets = many.reuseport_sockets(host, port, processes)
        except OSError as exc:
            _fail(f"--port={port}: cannot listen on {host}: {exc.strerror}")
        many.run(make_node, sockets, listening)
        return
    node = make_node()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            try:
                bound = await nursery.start(node.serve, host, port)
            except OSError as exc:
                _fail(f"--port={port}: cannot listen on {host}: {exc.strerror}")
            listening(bound)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)


@main.group()
@click.option("--url", envvar="LB_URL", default="http://127.0.0.1:8000", show_default=True,
              help="The running lb [env LB_URL]")
@click.option("--master-key", envvar=["LB_MASTER_KEY", "LITELLM_MASTER_KEY"], default="",
              help="lb's master key [env LB_MASTER_KEY]")
@click.pass_context
def keys(ctx: click.Context, url: str, master_key: str) -> None:
    """Manage virtual keys of a running lb (its admin API, with the master key)."""
    if not master_key:
        _fail("keys: the master key is needed (--master-key or LB_MASTER_KEY)")
    ctx.obj = (url.rstrip("/"), master_key)


def _admin(ctx: click.Context, method: str, path: str, **kwargs: Any) -> None:
    """Call the admin API and print its JSON answer; an error's message and exit 1."""
    import httpx
    import orjson

    url, master_key = ctx.obj
    try:
        answer = httpx.request(method, url + path, headers={
            "authorization": f"Bearer {master_key}"}, timeout=30, **kwargs)
    except httpx.HTTPError as exc:
        click.echo(f"lb: cannot reach {url}: {exc}", err=True)
        sys.exit(1)
    if answer.status_code != 200:
        try:
            message = answer.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = answer.text
        click.echo(f"lb: {answer.status_code}: {message}", err=True)
        sys.exit(1)
    click.echo(orjson.dumps(answer.json(), option=orjson.OPT_INDENT_2).decode())


@keys.command("create")
@click.option("--models", default="", help="Models it may use, comma separated (default: all)")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute")
@click.option("--burst", type=click.IntRange(min=1), help="Requests at once (with --rpm)")
@click.option("--parallel", type=click.IntRange(min=1), help="Requests in flight at once")
@click.option("--budget", type=click.FloatRange(min=0), help="USD per budget period")
@click.option("--budget-duration", help="Budget period: 30d, 1mo, 24h... (default: for ever)")
@click.option("--duration", help="Expires after: 30d, 12h... (default: never)")
@click.option("--alias", help="A name for the key (unique)")
@click.option("--metadata", help="JSON object kept with the key")
@click.pass_context
def keys_create(
    ctx: click.Context, models: str, rpm: int | None, tpm: int | None, burst: int | None,
    parallel: int | None, budget: float | None, budget_duration: str | None,
    duration: str | None, alias: str | None, metadata: str | None,
) -> None:
    """Make a key; it is printed once (`key`) and stored only hashed."""
    import orjson

    fields: dict[str, Any] = {
        "models": [m.strip() for m in models.split(",") if m.strip()], "rpm_limit": rpm,
        "tpm_limit": tpm, "rpm_burst": burst, "max_parallel_requests": parallel,
        "max_budget": budget, "budget_duration": budget_duration, "duration": duration,
        "key_alias": alias,
    }
    if metadata:
        try:
            fields["metadata"] = orjson.loads(metadata)
        except orjson.JSONDecodeError as exc:
            _fail(f"--metadata: not JSON ({exc})")
    _admin(ctx, "POST", "/key/generate", json={k: v for k, v in fields.items() if v is not None})


@keys.command("list")
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """Every key, with its limits and spend (never the keys themselves)."""
    _admin(ctx, "GET", "/key/list", params={"return_full_object": "true"})


@keys.command("info")
@click.argument("key")
@click.pass_context
def keys_info(ctx: click.Context, key: str) -> None:
    """One key (the key, its token or its alias): limits and spend."""
    _admin(ctx, "GET", "/key/info", params={"key": key})


@keys.command("revoke")
@click.argument("key", nargs=-1, required=True)
@click.pass_context
def keys_revoke(ctx: click.Context, key: tuple[str, ...]) -> None:
    """Delete keys (keys, tokens or aliases); every instance refuses them within a second."""
    _admin(ctx, "POST", "/key/delete", json={"keys": list(key)})


def _add_bench() -> None:
    from lb.bench.command import bench

    main.add_command(bench)


_add_bench()

if __name__ == "__main__":
    main()
