"""`lb bench`: the click command. Builds the plan from the options, runs it (once, or once per
upstream of `--against`), then prints and writes the reports."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import click
import orjson
import trio

from lb.bench import report
from lb.bench.runner import Plan, Run, run
from lb.bench.schedule import StopRule
from lb.bench.workloads import BUILT_IN, ENDPOINTS, BuiltIn, Workload, WorkloadError, load_jsonl


def _fail(message: str) -> None:
    click.echo(f"lb bench: {message}", err=True)
    sys.exit(2)


@click.command()
@click.argument("url", required=False)
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=None,
              help="Closed loop: this many requests in flight [default 1 without --rate]")
@click.option("-r", "--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Open loop: Poisson arrivals at this many requests/s")
@click.option("-d", "--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds of sending (with --requests: whichever ends first)")
@click.option("-n", "--requests", type=click.IntRange(min=0), default=None,
              help="Requests to send [default 100 without --duration]")
@click.option("--endpoint", type=click.Choice(list(ENDPOINTS)), default="chat", show_default=True)
@click.option("--stream/--no-stream", default=False, show_default=True)
@click.option("--model", default="mock-model", show_default=True)
@click.option("--workload", default="fixed", show_default=True,
              help=f"{', '.join(BUILT_IN)}, or a JSONL file of request bodies")
@click.option("--prompt-words", type=click.IntRange(min=1), default=32, show_default=True,
              help="fixed, shared-prefix (after the prefix), multi-turn (per turn)")
@click.option("--min-words", type=click.IntRange(min=1), default=8, show_default=True,
              help="random")
@click.option("--max-words", type=click.IntRange(min=1), default=512, show_default=True,
              help="random")
@click.option("--prefixes", type=click.IntRange(min=1), default=4, show_default=True,
              help="shared-prefix: distinct system prompts")
@click.option("--prefix-words", type=click.IntRange(min=1), default=1024, show_default=True,
              help="shared-prefix: words per system prompt")
@click.option("--conversations", type=click.IntRange(min=1), default=16, show_default=True,
              help="multi-turn")
@click.option("--turns", type=click.IntRange(min=1), default=8, show_default=True,
              help="multi-turn")
@click.option("--max-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True,
              help="Requests sent (and not counted) before the run")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Seconds per request")
@click.option("--api-key", default=None, help="Sent as Authorization: Bearer [env OPENAI_API_KEY]")
@click.option("-H", "--header", "headers", multiple=True, help="'Name: value' (repeatable)")
@click.option("--compare", default=None,
              help="Also send each request here (alternately first); report paired added latency")
@click.option("--against", "against", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A YAML file with `nodes:` (as lb's config): the suite against each in turn")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), default=None,
              help="Write the report as JSON here ('-' for stdout, then no table)")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), default=None,
              help="Write latency-cdf.png, ttft-over-time.png, throughput.png here (matplotlib)")
def bench(url: str | None, concurrency: int | None, rate: float | None, duration: float | None,
          requests: int | None, endpoint: str, stream: bool, model: str, workload: str,
          prompt_words: int, min_words: int, max_words: int, prefixes: int, prefix_words: int,
          conversations: int, turns: int, max_tokens: int, seed: int, warmup: int,
          timeout: float, api_key: str | None, headers: tuple[str, ...], compare: str | None,
          against: str | None, json_file: str | None, plot_dir: str | None) -> None:
    """Load-test an OpenAI-compatible endpoint: lb, a node directly or any gateway.

    URL is the server's base (http://host:port, or with a path prefix such as .../v1 dropped:
    request paths are /v1/...)."""
    if (url is None) == (against is None):
        _fail("give a URL or --against FILE (one of the two)")
    if rate is not None and concurrency is not None:
        _fail("--rate (open loop) and --concurrency (closed loop) exclude each other")
    if duration is None and requests is None:
        requests = 100
    try:
        load = _workload(workload, endpoint=endpoint, model=model, stream=stream,
                         max_tokens=max_tokens, seed=seed, prompt_words=prompt_words,
                         min_words=min_words, max_words=max_words, prefixes=prefixes,
                         prefix_words=prefix_words, conversations=conversations, turns=turns)
    except WorkloadError as exc:
        _fail(str(exc))
    _raise_fd_limit()
    extra = [_header(h) for h in headers]
    key = api_key if api_key is not None else _env_key()
    targets = [(url, url, key)] if url else _against(against or "")
    stop = StopRule(duration=duration, requests=requests)
    runs: list[tuple[str, Run]] = []
    for label, target, node_key in targets:
        auth = [(b"authorization", f"Bearer {node_key}".encode())] if node_key else []
        try:
            plan = Plan(url=target.rstrip("/"), workload=load, stop=stop,
                        concurrency=None if rate is not None else (concurrency or 1),
                        rate=rate, compare=compare, seed=seed, timeout=timeout,
                        warmup=warmup, headers=tuple(auth + extra))
        except ValueError as exc:
            _fail(str(exc))
        total = requests if duration is None else None
        with report.progress_bar(total, label) as progress:
            runs.append((label, trio.run(run, plan, progress)))
    summaries = [report.summary(r, label) for label, r in runs]
    document: Any = summaries[0] if url else {"against": summaries}
    if json_file == "-":
        sys.stdout.buffer.write(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        for s in summaries:
            report.print_table(report.render_run(s))
        if against:
            report.print_table(report.render_against(summaries))
        if json_file:
            Path(json_file).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    if plot_dir:
        try:
            paths = report.plot(runs, Path(plot_dir))
        except RuntimeError as exc:
            _fail(str(exc))
        click.echo("plots: " + ", ".join(str(p) for p in paths), err=True)


def _workload(name: str, *, endpoint: str, model: str, **options: Any) -> Workload:
    if name in BUILT_IN:
        return BuiltIn(kind=name, endpoint=endpoint, model=model, **options)
    if not Path(name).is_file():
        raise WorkloadError(f"--workload {name!r}: not one of {', '.join(BUILT_IN)} nor a file")
    return load_jsonl(name, endpoint=endpoint, model=model)


def _raise_fd_limit() -> None:
    """An open loop against a slow target holds a connection per request in flight: allow
    as many as the hard limit does, not the usual soft 1,024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _header(text: str) -> tuple[bytes, bytes]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        _fail(f"--header {text!r}: expected 'Name: value'")
    return name.strip().lower().encode("latin-1"), value.strip().encode("latin-1")


def _env_key() -> str | None:
    import os

    return os.environ.get("OPENAI_API_KEY") or None


def _against(path: str) -> list[tuple[str, str, str | None]]:
    """(label, url, api key) of each node in a YAML file of lb's own format (`nodes:`)."""
    from lb.config import ConfigError, load_settings

    try:
        settings = load_settings(config_file=path, env={}, flags={})
    except ConfigError as exc:
        _fail(f"--against {path}: {exc}")
    nodes = settings.all_nodes()
    if not nodes:
        _fail(f"--against {path}: no nodes in the file")
    return [(node.key, node.url, node.api_key or None) for node in nodes]
