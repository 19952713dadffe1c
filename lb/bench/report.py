"""What a bench run shows: the summary (a plain dict, the JSON report), the tables, the live
progress and the plots. rich draws the tables and the progress bar; matplotlib (the `plot`
extra) is imported only for `--plot`."""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lb.bench.runner import Progress, Run, Sample, rate_of
from lb.bench.stats import cdf, paired_differences, per_second, summarize


def _ms(values: Sequence[float]) -> dict[str, float | int]:
    return summarize(v * 1000 for v in values).as_dict()


def side_summary(samples: Sequence[Sample], elapsed: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in ok)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": dict(Counter(s.error for s in samples if s.error is not None)),
        "requests_per_s": rate_of(len(ok), elapsed),
        "tokens": tokens,
        "tokens_per_s": rate_of(tokens, elapsed),
        "latency_ms": _ms([s.latency for s in ok if s.latency is not None]),
        "ttft_ms": _ms([s.ttft for s in ok if s.ttft is not None]),
        "itl_ms": _ms([gap for s in ok for gap in s.itls]),
    }


def summary(run: Run, label: str | None = None) -> dict[str, Any]:
    plan = run.plan
    out: dict[str, Any] = {
        "label": label or plan.url,
        "url": plan.url,
        "loop": "open" if plan.rate is not None else "closed",
        "concurrency": plan.concurrency,
        "rate": plan.rate,
        "duration_s": plan.stop.duration,
        "max_requests": plan.stop.requests,
        "elapsed_s": run.elapsed,
        "started_at": run.wall_start,
        "generator_cpu_s": run.cpu,
        "generator_cpu_ms_per_request": rate_of(
            round(run.cpu * 1000 * 1000), len(run.samples) + len(run.compared)) / 1000,
        **side_summary(run.samples, run.elapsed),
    }
    if plan.rate is not None:
        out["send_lag_ms"] = _ms([s.lag for s in run.samples])
    if plan.compare:
        out["compare"] = {"url": plan.compare, **side_summary(run.compared, run.elapsed)}
        pairs = list(zip(run.samples, run.compared, strict=True))
        out["added_latency_ms"] = _ms(paired_differences((a.latency, b.latency) for a, b in pairs))
        out["added_ttft_ms"] = _ms(paired_differences((a.ttft, b.ttft) for a, b in pairs))
    return out


# --- tables ---------------------------------------------------------------------------------

_COLS = ("p50", "p90", "p95", "p99", "max")


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in sorted(errors.items())) or "0"


def latency_rows(s: dict[str, Any]) -> list[tuple[str, list[str]]]:
    rows = [("end to end (ms)", s["latency_ms"]), ("TTFT (ms)", s["ttft_ms"])]
    if s["itl_ms"]["count"]:
        rows.append(("inter-token (ms)", s["itl_ms"]))
    if "added_latency_ms" in s:
        rows.append(("end to end, --compare (ms)", s["compare"]["latency_ms"]))
        rows.append(("added, paired (ms)", s["added_latency_ms"]))
        if s["added_ttft_ms"]["count"] and s["itl_ms"]["count"]:
            rows.append(("added TTFT, paired (ms)", s["added_ttft_ms"]))
    if "send_lag_ms" in s:
        rows.append(("generator send lag (ms)", s["send_lag_ms"]))
    return [(name, [_f(d[c], 2) for c in _COLS]) for name, d in rows]


def render_run(s: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    head = Table(title=f"lb bench: {s['label']}", show_header=True)
    for col in ("requests", "ok", "errors", "requests/s", "tokens/s", "seconds"):
        head.add_column(col, justify="right")
    head.add_row(_f(s["requests"]), _f(s["ok"]), _errors(s["errors"]),
                 _f(s["requests_per_s"]), _f(s["tokens_per_s"]), _f(s["elapsed_s"], 2))
    lat = Table(show_header=True)
    lat.add_column("latency")
    for col in _COLS:
        lat.add_column(col, justify="right")
    for name, cells in latency_rows(s):
        lat.add_row(name, *cells)
    return Group(head, lat)


def render_against(summaries: Sequence[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="lb bench --against", show_header=True)
    for col in ("upstream", "ok", "errors", "req/s", "tok/s", "e2e p50", "e2e p99",
                "TTFT p50", "TTFT p99"):
        table.add_column(col, justify="left" if col == "upstream" else "right")
    for s in summaries:
        table.add_row(s["label"], _f(s["ok"]), _errors(s["errors"]), _f(s["requests_per_s"]),
                      _f(s["tokens_per_s"]), _f(s["latency_ms"]["p50"], 2),
                      _f(s["latency_ms"]["p99"], 2), _f(s["ttft_ms"]["p50"], 2),
                      _f(s["ttft_ms"]["p99"], 2))
    return table


def print_table(renderable: Any) -> None:
    from rich.console import Console

    # Not a terminal (a file, a pipe): a fixed width rather than rich's default of 80.
    Console(width=None if sys.stdout.isatty() else 120).print(renderable)


@contextmanager
def progress_bar(total: int | None, description: str) -> Iterator[Progress | None]:
    """A live bar on stderr when it is a terminal; nothing (no noise in logs) otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import (
        Progress as Bar,
    )

    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# --- plots ----------------------------------------------------------------------------------


def plot(runs: Sequence[tuple[str, Run]], outdir: Path) -> list[Path]:
    """latency-cdf.png, ttft-over-time.png and throughput.png in `outdir` (one line per run)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'lb[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run in runs:
        series = [(v * 1000, f) for v, f in
                  cdf(s.latency for s in run.samples if s.latency is not None)]
        if series:
            ax.plot(*zip(*series, strict=True), label=label)
        if run.plan.compare:
            series = [(v * 1000, f) for v, f in
                      cdf(s.latency for s in run.compared if s.latency is not None)]
            if series:
                ax.plot(*zip(*series, strict=True), label=f"{run.plan.compare} (compare)")
    ax.set(xlabel="end-to-end latency (ms)", ylabel="fraction of requests",
           title="Latency CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, outdir / "latency-cdf.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run in runs:
        points = sorted((s.start, s.ttft * 1000) for s in run.samples if s.ttft is not None)
        if points:
            ax.plot(*zip(*points, strict=True), ".", markersize=2, label=label)
    ax.set(xlabel="seconds into the run", ylabel="TTFT (ms)", title="Time to first token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, outdir / "ttft-over-time.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run in runs:
        ok = [s for s in run.samples if s.latency is not None]
        rps = per_second(s.start + s.latency for s in ok if s.latency is not None)
        if rps:
            ax.plot(range(len(rps)), rps, drawstyle="steps-post", label=label)
    ax.set(xlabel="seconds into the run", ylabel="answers per second", title="Throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, outdir / "throughput.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
