"""The Grafana dashboard (`docker/grafana/lb-dashboard.json`) and its provisioning files: valid
structure, and queries only of the metrics lb exports."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

GRAFANA = Path(__file__).resolve().parent.parent / "docker" / "grafana"

# The metrics lb exports at /metrics (lb/obs/metrics.py), by the names the dashboard uses.
COUNTERS_AND_GAUGES = frozenset({
    "lb_requests_total",
    "lb_request_failures_total",
    "lb_tokens_total",
    "lb_node_inflight",
    "lb_node_capacity",
    "lb_node_breaker_state",
    "lb_node_up",
    "lb_failovers_total",
    "lb_attempts_total",
    "lb_queue_length",
    "lb_client_disconnects_total",
})
HISTOGRAMS = frozenset({"lb_request_duration_seconds", "lb_time_to_first_token_seconds"})
KNOWN = COUNTERS_AND_GAUGES | {
    f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}

PROMQL_WORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
})
_LABELS = re.compile(r"\{[^}]*\}")  # label matchers: {outcome="failure"}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)")  # by (le, model)
_RANGE = re.compile(r"\[[^\]]*\]")  # [5m]
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'")
_NAME = re.compile(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, labels or keywords)."""
    bare = _STRING.sub('""', expr)
    for pattern in (_LABELS, _GROUPING, _RANGE):
        bare = pattern.sub(" ", bare)
    return {
        name for name, call in _NAME.findall(bare)
        if not call and name.lower() not in PROMQL_WORDS
    }


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((GRAFANA / "lb-dashboard.json").read_text())
    return loaded


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_metric_names_are_found_in_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum(rate(lb_request_duration_seconds_bucket[5m])) by (le, '
        "model))"
    ) == {"lb_request_duration_seconds_bucket"}
    assert metric_names(
        'sum(rate(lb_attempts_total{outcome="failure", node=~"a.*"}[5m])) by (node) '
        "/ on (node) group_left sum(rate(lb_requests_totl[5m])) > bool 0.5"
    ) == {"lb_attempts_total", "lb_requests_totl"}
    assert metric_names("lb_node_up == 0 or max_over_time(lb_queue_length[1h:1m])") == {
        "lb_node_up", "lb_queue_length",
    }
    assert not metric_names("vector(1)")


def test_the_dashboard_has_the_keys_grafana_needs(dashboard: dict[str, Any]) -> None:
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time", "version"):
        assert key in dashboard, key
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and re.fullmatch(r"[\w-]{1,40}", dashboard["uid"])
    assert dashboard["panels"], "no panels"
    # The Prometheus to query is a variable: the dashboard works provisioned or imported.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_panel_has_an_id_a_datasource_and_queries(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for panel in panels:
        title = panel.get("title")
        assert title and panel.get("type"), panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], f"{title}: no targets"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{title}: duplicate refIds"
        for target in panel["targets"]:
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), title
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for cell in itertools.product(range(pos["x"], pos["x"] + pos["w"]),
                                      range(pos["y"], pos["y"] + pos["h"])):
            assert cell not in cells, f"{panel['title']} overlaps {cells[cell]}"
            cells[cell] = panel["title"]


def test_every_query_reads_only_metrics_lb_exports(dashboard: dict[str, Any]) -> None:
    for expr in exprs(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= KNOWN, f"unknown metric(s) {sorted(names - KNOWN)} in {expr!r}"


def test_every_metric_lb_exports_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(expr) for expr in exprs(dashboard)))
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert shown >= COUNTERS_AND_GAUGES | HISTOGRAMS, sorted(
        (COUNTERS_AND_GAUGES | HISTOGRAMS) - shown
    )


def test_latency_panels_show_p50_and_p95_per_model(dashboard: dict[str, Any]) -> None:
    for histogram in HISTOGRAMS:
        queries = [expr for expr in exprs(dashboard) if f"{histogram}_bucket" in expr]
        for quantile in ("0.50", "0.95"):
            assert any(
                f"histogram_quantile({quantile}," in expr and re.search(r"by \(le, model\)", expr)
                for expr in queries
            ), (histogram, quantile)


def test_breaker_states_are_named(dashboard: dict[str, Any]) -> None:
    panel = next(p for p in dashboard["panels"]
                 if any("lb_node_breaker_state" in t["expr"] for t in p["targets"]))
    mapping = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {value: entry["text"] for value, entry in mapping.items()} == {
        "0": "closed", "1": "half-open", "2": "open",
    }


def test_provisioning_files_parse() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    assert datasources["apiVersion"] == 1
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"].startswith("http")
    assert prometheus["uid"] and prometheus["isDefault"] is True

    dashboards = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "lb.yaml").read_text()
    )
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
