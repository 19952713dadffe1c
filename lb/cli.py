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
        if settings.catalogue.master_key:  # until lb checks client keys (the policy issue)
            _fail(
                "general_settings.master_key is set, but lb does not check client keys yet: "
                "refusing to serve without the authentication the file asks for"
            )
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
def mock(
    host: str, port: int, models: tuple[str, ...], ttft_ms: float, itl_ms: float, tokens: int,
    embedding_dim: int, fault: str, name: str, busy_probes: bool, strict_request_id: bool,
    ignore_max_completion_tokens: bool, prefix_cache: bool, prefill_ms_per_kb: float,
    cache_entries: int, ttft_per_inflight_ms: float, dialect: str, api_key: str,
) -> None:
    """Run a mock LLM node, OpenAI-compatible or Anthropic (for tests, benchmarks, demos)."""
    from lb.testing import MockNode
    from lb.testing.faults import parse_fault

    if fault:
        try:
            parse_fault(fault)
        except ValueError as exc:
            _fail(f"--fault={fault!r}: {exc}")
    node = MockNode(
        models=models or ("mock-model",), ttft_ms=ttft_ms, itl_ms=itl_ms, tokens=tokens,
        embedding_dim=embedding_dim, fault=fault, name=name, busy_probes=busy_probes,
        strict_request_id=strict_request_id,
        honours_max_completion_tokens=not ignore_max_completion_tokens,
        prefix_cache=prefix_cache, prefill_ms_per_kb=prefill_ms_per_kb,
        cache_entries=cache_entries, ttft_per_inflight_ms=ttft_per_inflight_ms,
        dialect=dialect, api_key=api_key,
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            try:
                bound = await nursery.start(node.serve, host, port)
            except OSError as exc:
                _fail(f"--port={port}: cannot listen on {host}: {exc.strerror}")
            print(f"lb mock listening on http://{host}:{bound}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)


if __name__ == "__main__":
    main()
