"""The Grafana dashboards: generated, committed, and asking the right questions.

The committed JSON under ``grafana/dashboards/`` must be exactly what
``python -m grafana.generate`` writes. The panels' queries are checked here for
what Grafana needs (variables, ``$__rate_interval``, exemplars, units) and
parsed by ``promtool``; ``test_live_prometheus.py`` runs them for data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
import yaml

from tests.conftest import generate, needs_generator, require_tool

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"
METRICS = (
    "sigtrace_signal_sends_total",
    "sigtrace_signal_duration_seconds",
    "sigtrace_receiver_duration_seconds",
    "sigtrace_receiver_errors_total",
    "sigtrace_http_request_duration_seconds",
    "sigtrace_http_request_exceptions_total",
)
VARIABLE = re.compile(r"\$(?:job|instance|signal|receiver)\b")
SELECTOR = re.compile(r"(?P<metric>sigtrace_\w+)\{(?P<matchers>[^}]*)\}")


def committed() -> dict[str, dict[str, t.Any]]:
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARDS_DIR.glob("*.json"))
    }


def panels(board: dict[str, t.Any]) -> list[dict[str, t.Any]]:
    return [panel for panel in board["panels"] if panel["type"] != "row"]


def panel(title: str) -> dict[str, t.Any]:
    matches = [p for board in committed().values() for p in panels(board) if p["title"] == title]
    assert len(matches) == 1, f"{title!r}: {len(matches)} panels"
    return matches[0]


def exprs(p: dict[str, t.Any]) -> list[str]:
    return [target["expr"] for target in p["targets"]]


def all_targets() -> list[tuple[str, dict[str, t.Any], dict[str, t.Any]]]:
    return [
        (name, p, target)
        for name, board in committed().items()
        for p in panels(board)
        for target in p["targets"]
    ]


# --------------------------------------------------------------------------
# Generated and committed


@needs_generator
def test_committed_json_is_the_generator_s_output() -> None:
    generated = {name: generate.render(board) for name, board in generate.dashboards().items()}
    on_disk = {path.name: path.read_text() for path in sorted(DASHBOARDS_DIR.glob("*.json"))}
    assert sorted(on_disk) == sorted(generated), "run: python -m grafana.generate"
    for name, text in generated.items():
        assert on_disk[name] == text, f"{name} is stale: run python -m grafana.generate"


def generator_dirs(tmp_path: Path) -> list[str]:
    """``--out`` and ``--rules-dir`` in ``tmp_path`` (a copy of the rules): the
    generator writes nothing into the checkout."""
    shutil.copytree(ROOT / "grafana" / "rules", tmp_path / "rules")
    return ["--out", str(tmp_path / "dashboards"), "--rules-dir", str(tmp_path / "rules")]


@needs_generator
def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    dirs = generator_dirs(tmp_path)
    assert generate.main(dirs) == 0
    assert generate.main([*dirs, "--check"]) == 0
    stale = tmp_path / "dashboards" / "sigtrace-signals.json"
    stale.write_text(stale.read_text().replace("Receiver", "Receivr"))
    assert generate.main([*dirs, "--check"]) == 1


@needs_generator
def test_the_generator_runs_as_a_module(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grafana.generate", *generator_dirs(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != generate.RUNBOOK_URL_VARIABLE},
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "dashboards").iterdir()) == sorted(committed())


# --------------------------------------------------------------------------
# Dashboard structure


def test_dashboards_have_unique_uids_and_panel_ids() -> None:
    boards = committed()
    assert len(boards) >= 2
    assert len({board["uid"] for board in boards.values()}) == len(boards)
    for name, board in boards.items():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)) and 0 not in ids, name
        for p in panels(board):
            refs = [target["refId"] for target in p["targets"]]
            assert refs and all(refs) and len(refs) == len(set(refs)), p["title"]
            grid = p["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]


def test_variables_datasource_job_instance_signal_receiver() -> None:
    boards = committed()
    names = {
        name: [var["name"] for var in board["templating"]["list"]] for name, board in boards.items()
    }
    assert names["sigtrace-requests.json"] == ["datasource", "job", "instance"]
    assert names["sigtrace-signals.json"] == ["datasource", "job", "instance", "signal", "receiver"]
    for board in boards.values():
        for var in board["templating"]["list"]:
            if var["name"] == "datasource":
                assert var["type"] == "datasource" and var["query"] == "prometheus"
                continue
            assert var["type"] == "query"
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert var["query"].startswith("label_values(")
            assert var["query"].endswith(f", {var['name']})")
            # "All" becomes .*, which the =~ matchers of every query accept.
            assert var["includeAll"] and var["multi"] and var["allValue"] == ".*"


def test_every_panel_queries_the_datasource_variable() -> None:
    for _, p, _target in all_targets():
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]


def test_every_rate_uses_rate_interval_and_every_selector_the_variables() -> None:
    for name, p, target in all_targets():
        expr = target["expr"]
        windows = re.findall(r"\[([^\]]+)\]", expr)
        assert windows and set(windows) == {"$__rate_interval"}, (p["title"], expr)
        selectors = SELECTOR.findall(expr)
        assert selectors, expr
        for metric, matchers in selectors:
            assert metric.removesuffix("_bucket").removesuffix("_count") in METRICS, metric
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, expr
            if name == "sigtrace-signals.json":
                assert 'signal=~"$signal"' in matchers, expr
            if metric.startswith("sigtrace_receiver_"):
                assert 'receiver=~"$receiver"' in matchers, expr


def test_every_sigtrace_metric_is_on_a_dashboard() -> None:
    queried = " ".join(target["expr"] for _, _, target in all_targets())
    for metric in METRICS:
        assert metric in queried, metric


def test_request_panels() -> None:
    rate = panel("Request rate by endpoint")
    assert exprs(rate) == [
        'sum by (endpoint) (rate(sigtrace_http_request_duration_seconds_count{job=~"$job", '
        'instance=~"$instance"}[$__rate_interval])) > 0'
    ]
    assert rate["fieldConfig"]["defaults"]["unit"] == "reqps"
    errors = panel("Error ratio (5xx) by endpoint")
    assert 'status=~"5.."' in exprs(errors)[0] and " / " in exprs(errors)[0]
    assert errors["fieldConfig"]["defaults"]["unit"] == "percentunit"
    exceptions = panel("Unhandled exceptions (got_request_exception)")
    assert exprs(exceptions) == [
        'sum by (endpoint, exception) (rate(sigtrace_http_request_exceptions_total{job=~"$job", '
        'instance=~"$instance"}[$__rate_interval])) > 0'
    ]


def test_latency_panels_show_quantiles_with_exemplars() -> None:
    latency = panel("Latency by endpoint (p50, p95, p99)")
    quantiles = [re.findall(r"^histogram_quantile\(([0-9.]+), ", e) for e in exprs(latency)]
    assert quantiles == [["0.5"], ["0.95"], ["0.99"]]
    for e in exprs(latency):
        assert "sum by (le, endpoint) (rate(sigtrace_http_request_duration_seconds_bucket{" in e
    receivers = panel("Slowest receivers p95 / p99 (top 10)")
    assert [e[: len("topk(10, histogram_quantile(0.95")] for e in exprs(receivers)] == [
        "topk(10, histogram_quantile(0.95",
        "topk(10, histogram_quantile(0.99",
    ]
    for e in exprs(receivers):
        assert "sum by (le, signal, receiver) (rate(sigtrace_receiver_duration_seconds_bucket{" in e
    for p in (latency, receivers, panel("Signal dispatch latency p95 by signal")):
        assert p["fieldConfig"]["defaults"]["unit"] == "s"
        assert all(target["exemplar"] is True for target in p["targets"]), p["title"]


def test_receiver_latency_heatmap_reads_prometheus_buckets() -> None:
    heatmap = panel("Receiver latency heatmap")
    assert heatmap["type"] == "heatmap"
    (target,) = heatmap["targets"]
    assert target["format"] == "heatmap" and target["legendFormat"] == "{{le}}"
    assert target["exemplar"] is True
    assert target["expr"].startswith("sum by (le) (rate(sigtrace_receiver_duration_seconds_bucket{")
    assert heatmap["options"]["calculate"] is False
    assert heatmap["options"]["yAxis"]["unit"] == "s"


def test_signal_and_receiver_error_panels() -> None:
    assert exprs(panel("Signal send rate by signal")) == [
        'sum by (signal) (rate(sigtrace_signal_sends_total{job=~"$job", instance=~"$instance", '
        'signal=~"$signal"}[$__rate_interval])) > 0'
    ]
    (errors,) = exprs(panel("Receiver error rate"))
    assert errors.startswith(
        "sum by (signal, receiver, exception) (rate(sigtrace_receiver_errors_total{"
    )
    (ratio,) = exprs(panel("Receiver error ratio"))
    assert ratio.count("sum by (signal, receiver)") == 2 and "_count{" in ratio


def test_every_query_drops_series_without_traffic() -> None:
    """No query draws a quiet series: a rate must be above zero, and a quantile,
    ratio or heatmap is kept only where its count's rate is (else it is NaN)."""
    for name, p, target in all_targets():
        expr = target["expr"]
        where = f"{name} / {p['title']}: {expr}"
        if "histogram_quantile" in expr or "_bucket{" in expr:
            assert re.search(r" and on \([\w, ]*\) \(sum.*_count\{.*\) > 0\)\)?$", expr), where
        elif " / " in expr:
            assert re.search(r" / \(sum.*\) > 0\)$", expr), where
        else:
            assert expr.endswith(" > 0"), where


@pytest.mark.real
def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses each query (with the variables filled in) as a recording rule."""
    promtool = require_tool("promtool")
    rules = [
        {
            "record": f"dashboard:query_{number}:check",
            "expr": VARIABLE.sub(".*", target["expr"].replace("$__rate_interval", "5s")),
        }
        for number, (_, _, target) in enumerate(all_targets())
    ]
    assert all("$" not in rule["expr"] for rule in rules)
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@pytest.mark.parametrize("name", ["sigtrace-requests.json", "sigtrace-signals.json"])
def test_dashboards_link_to_each_other(name: str) -> None:
    board = committed()[name]
    assert board["tags"][0] == "sigtrace"
    (link,) = board["links"]
    assert link["type"] == "dashboards" and link["tags"] == ["sigtrace"]
    assert link["includeVars"] and link["keepTime"]
