"""Every dashboard query and rule expression, run against a live Prometheus.

The demo app (``python -m examples.demo``) serves traffic to itself and prints
its spans; Debian's ``prometheus`` scrapes its ``/metrics`` every second with
exemplar storage on and loads ``grafana/rules``. The tests then run each panel
query of the committed dashboards, each rule expression and each template
variable through the HTTP API, and look for trace ids in the exemplars.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import typing as t
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.app_process import stop_process
from tests.conftest import require_tool
from tests.servers import Server, start_gunicorn

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((ROOT / "grafana" / "rules").glob("*.yml"))

JOB = "sigtrace-demo"
RATE_INTERVAL = "5s"  # what Grafana's $__rate_interval is for a 1 s scrape interval, rounded up
START_TIMEOUT = 20.0  # seconds for the demo or Prometheus to come up
DATA_TIMEOUT = 30.0  # seconds from Prometheus' start: the deadline of every wait below
HTTP_TIMEOUT = 5.0
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
COMPARISON = re.compile(r"\s*(?:>=|<=|==|!=|>|<)\s*-?[0-9][0-9.e+-]*")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")
MULTIPROCESS_ERRORS = "multiprocess_errors"
"""In the rules that measure failures of PROMETHEUS_MULTIPROC_DIR: the demo is one
process without it, so a real gunicorn with a fault measures them instead."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


# --------------------------------------------------------------------------
# The demo app and Prometheus


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    port: int = 0

    def output(self) -> str:
        return "".join(self.lines)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    require_tool("prometheus")  # before starting anything: the demo is only for it
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "SIGTRACE_", "PROMETHEUS_MULTIPROC"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    stderr = (tmp_path_factory.mktemp("demo") / "stderr.log").open("w")
    # --duration bounds the demo even if this process dies before the finally.
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "examples.demo", "--host", "127.0.0.1", "--port", "0"),
            *("--traffic-rps", "20", "--duration", "120", "--raw-spans"),
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    app = Demo(proc)
    reader = threading.Thread(target=app.read, daemon=True)
    reader.start()
    try:

        def listening() -> bool:
            assert proc.poll() is None, f"the demo exited: {app.output()}"
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", app.output())
            if found:
                app.port = int(found.group(1))
            return found is not None

        wait_for("the demo to listen", listening, START_TIMEOUT)
        yield app
    finally:
        stop_process(proc, timeout=5)
        reader.join(timeout=5)
        stderr.close()


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.started = time.monotonic()

    def get(self, path: str, **params: str) -> t.Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # 400: a bad query, with Prometheus' reason
            body = json.load(error)
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def remaining(self) -> float:
        """Seconds left until the module's shared deadline (at least one more try)."""
        return max(1.0, self.started + DATA_TIMEOUT - time.monotonic())

    def query(self, expr: str) -> list[dict[str, t.Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data}"
        return t.cast(list[dict[str, t.Any]], data["result"])

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, t.Any]]:
        data = self.get("/api/v1/query_range", query=expr, start=str(start), end=str(end), step="1")
        assert data["resultType"] == "matrix", f"{expr}: {data}"
        return t.cast(list[dict[str, t.Any]], data["result"])

    def first_data(self, exprs: list[str]) -> dict[str, list[dict[str, t.Any]]]:
        """Each query's first result with a number in it, polled until the deadline.

        A query whose result never had a number (empty, or NaN only: 0/0, an
        empty histogram) maps to its last result.
        """
        results: dict[str, list[dict[str, t.Any]]] = {expr: [] for expr in exprs}
        waiting = list(exprs)
        deadline = self.started + DATA_TIMEOUT
        while waiting:
            for expr in list(waiting):
                results[expr] = self.query(expr)
                if has_number(results[expr]):
                    waiting.remove(expr)
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        return results


def scraping(job: str, port: int, rules: bool = False) -> dict[str, t.Any]:
    """A Prometheus config: ``job`` scrapes ``127.0.0.1:port/metrics`` every
    second; with ``rules``, grafana/rules evaluated every second."""
    config: dict[str, t.Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            }
        ],
    }
    if rules:
        config["rule_files"] = [str(path) for path in RULE_FILES]
    return config


@contextmanager
def running_prometheus(
    binary: str, work: Path, data: Path, config: dict[str, t.Any]
) -> Iterator[tuple[subprocess.Popen[bytes], Prometheus]]:
    """Prometheus with ``config`` and exemplar storage, on 127.0.0.1 (a free port),
    logging to ``work/prometheus.log``; stopped on leaving the block."""
    (work / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    with (work / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--enable-feature=exemplar-storage",
            ],
            cwd=work,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc, Prometheus(port)
        finally:
            stop_process(proc, timeout=5)


@pytest.fixture(scope="module")
def prometheus(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = require_tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = scraping(JOB, demo.port, rules=True)
    with running_prometheus(binary, work, work / "data", config) as (proc, server):

        def ready() -> bool:
            assert proc.poll() is None, (work / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{server.base}/-/ready", timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for("Prometheus to be ready", ready, START_TIMEOUT)
        server.started = time.monotonic()
        yield server


# --------------------------------------------------------------------------
# What the dashboards and rule files ask


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, expr) of every query of every dashboard."""
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((board["title"], panel["title"], target["expr"]))
    return found


def dashboard_variables() -> list[tuple[str, str, str]]:
    """(dashboard title, variable name, query) of every query variable."""
    return [
        (json.loads(path.read_text())["title"], var["name"], var["query"])
        for path in DASHBOARDS
        for var in json.loads(path.read_text())["templating"]["list"]
        if var["type"] == "query"
    ]


def rules(kind: str) -> list[dict[str, t.Any]]:
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            found.extend(rule for rule in group["rules"] if kind in rule)
    return found


def has_number(result: list[dict[str, t.Any]]) -> bool:
    return any(sample["value"][1] != "NaN" for sample in result)


def substitute(expr: str, values: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in ("job", "instance", "signal", "receiver"):
        expr = expr.replace(f"${name}", values.get(name, ".*"))
    assert "$" not in expr, f"a template variable is left in {expr}"
    return expr


def grafana_regex_escape(value: str) -> str:
    """A variable's value as Grafana puts it in a PromQL regex string.

    Regex metacharacters get a backslash, itself escaped in the PromQL string.
    """
    return re.sub(r"[\\^$*+?.()|{}\[\]]", lambda m: "\\\\" + m.group(0), value)


def real_values(demo: Demo) -> dict[str, str]:
    """The job and instance values as Grafana fills them in."""
    return {
        "job": grafana_regex_escape(JOB),
        "instance": grafana_regex_escape(f"127.0.0.1:{demo.port}"),
    }


def test_the_dashboards_and_rules_under_test_exist() -> None:
    assert len(DASHBOARDS) >= 2 and len(dashboard_targets()) >= 15
    assert rules("record") and rules("alert")


def test_every_dashboard_query_returns_data(prometheus: Prometheus, demo: Demo) -> None:
    values = real_values(demo)
    exprs = {substitute(expr, values): (board, panel) for board, panel, expr in dashboard_targets()}
    results = prometheus.first_data(list(exprs))
    empty = [f"{exprs[expr][0]} / {exprs[expr][1]}: {expr}" for expr, r in results.items() if not r]
    assert not empty, "queries without data:\n" + "\n".join(empty)
    nan = [expr for expr, result in results.items() if result and not has_number(result)]
    assert not nan, "queries with only NaN:\n" + "\n".join(nan)
    # Every series, at every step since the scrapes began, as a panel draws them:
    # a series without traffic must be dropped, not drawn as NaN.
    end = time.time()
    start = end - (time.monotonic() - prometheus.started)
    nan_series = []
    for expr, (board, panel) in exprs.items():
        instant = [s["metric"] for s in results[expr] if s["value"][1] == "NaN"]
        ranged = [
            s["metric"]
            for s in prometheus.query_range(expr, start, end)
            if any(value == "NaN" for _, value in s["values"])
        ]
        if instant or ranged:
            nan_series.append(f"{board} / {panel}: {expr}\n  NaN series: {instant or ranged}")
    assert not nan_series, "queries with NaN series:\n" + "\n".join(nan_series)


def test_every_dashboard_variable_has_values(prometheus: Prometheus, demo: Demo) -> None:
    for board, name, query in dashboard_variables():
        found = LABEL_VALUES.match(query)
        assert found, f"{board}: ${name} is not label_values(selector, label): {query}"
        selector = substitute(found.group("selector"), {})
        label = found.group("label")
        assert label == name
        values: list[str] = []
        deadline = prometheus.started + DATA_TIMEOUT
        while not values and time.monotonic() < deadline:
            values = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
            time.sleep(0 if values else 0.5)
        assert values, f"{board}: ${name} has no values ({query})"
        if name == "job":
            assert values == [JOB]
        if name == "instance":
            assert values == [f"127.0.0.1:{demo.port}"]
        if name == "signal":
            assert "user-signed-up" in values
        if name == "receiver":
            assert "examples.signup_app.write_audit_log" in values


def demo_rules(kind: str) -> list[dict[str, t.Any]]:
    """The rules the demo's traffic measures (not the multiprocess ones)."""
    return [rule for rule in rules(kind) if MULTIPROCESS_ERRORS not in rule["expr"]]


def test_every_recording_rule_returns_data_and_is_recorded(prometheus: Prometheus) -> None:
    records = demo_rules("record")
    results = prometheus.first_data(
        [rule["expr"] for rule in records] + [rule["record"] for rule in records]
    )
    empty = [expr for expr, result in results.items() if not result]
    assert not empty, "rules without data:\n" + "\n".join(empty)
    for rule in records:
        for sample in results[rule["record"]]:
            assert sample["metric"]["__name__"] == rule["record"]
            assert sample["metric"]["job"] == JOB


def test_every_alert_expression_measures_data(prometheus: Prometheus) -> None:
    """Each alert's expression is valid, and without its thresholds returns data.

    With the thresholds in place an expression returns data only while its
    alert condition holds, which depends on the demo's traffic; without them
    it returns what the alert measures, which must exist for every alert.
    """
    alerts = demo_rules("alert")
    measures = {}
    for rule in alerts:
        prometheus.query(rule["expr"])  # valid PromQL, whatever the current values
        measure = COMPARISON.sub("", rule["expr"])
        assert measure != rule["expr"], f"{rule['alert']} compares nothing: {rule['expr']}"
        measures[measure] = rule["alert"]
    results = prometheus.first_data(list(measures))
    empty = [f"{measures[expr]}: {expr}" for expr, result in results.items() if not result]
    assert not empty, "alert measures without data:\n" + "\n".join(empty)


def test_rules_are_loaded_and_healthy(prometheus: Prometheus) -> None:
    expected = {rule.get("record") or rule["alert"] for rule in rules("expr")}

    def evaluated() -> bool:
        loaded = [
            rule for group in prometheus.get("/api/v1/rules")["groups"] for rule in group["rules"]
        ]
        return {rule["name"] for rule in loaded} == expected and all(
            rule["health"] == "ok" for rule in loaded
        )

    wait_for("every rule to be evaluated without error", evaluated, prometheus.remaining())


def test_the_demo_s_exceptions_make_an_alert_pending(prometheus: Prometheus) -> None:
    """/boom raises on every call: its exceptions alert goes pending (for: 5m).

    Only this alert: the others need more than the test's half minute of data
    in their 5-minute windows to reach their thresholds or traffic guards.
    """
    seen: list[dict[str, t.Any]] = []

    def pending_for_boom() -> bool:
        seen[:] = prometheus.get("/api/v1/alerts")["alerts"]
        return any(
            alert["state"] == "pending"
            and alert["labels"]
            == {
                "alertname": "SigtraceUnhandledExceptions",
                "severity": "warning",
                "job": JOB,
                "endpoint": "boom",
                "exception": "ZeroDivisionError",
            }
            and alert["annotations"]["runbook_url"].endswith("#sigtraceunhandledexceptions")
            for alert in seen
        )

    try:
        wait_for(
            "SigtraceUnhandledExceptions pending for /boom",
            pending_for_boom,
            prometheus.remaining(),
        )
    except AssertionError as error:
        raise AssertionError(f"{error}; alerts: {seen}") from None


@pytest.mark.parametrize(
    "metric", ["sigtrace_http_request_duration_seconds", "sigtrace_receiver_duration_seconds"]
)
def test_exemplars_carry_trace_ids_of_the_demo_s_spans(
    prometheus: Prometheus, demo: Demo, metric: str
) -> None:
    trace_ids: set[str] = set()

    def printed_trace_ids() -> bool:
        now = time.time()
        series = prometheus.get(
            "/api/v1/query_exemplars",
            query=f'{metric}_bucket{{job="{JOB}"}}',
            start=str(now - 120),
            end=str(now),
        )
        for entry in series:
            for exemplar in entry["exemplars"]:
                trace_id = exemplar["labels"]["trace_id"]
                assert TRACE_ID.match(trace_id), exemplar
                trace_ids.add(trace_id)
        # With --raw-spans the demo prints each span as "[span] <trace id> <span id> ..."
        # as it ends.
        output = demo.output()
        return any(f"[span] {trace_id} " in output for trace_id in trace_ids)

    wait_for(
        f"an exemplar of {metric} whose trace the demo printed",
        printed_trace_ids,
        prometheus.remaining(),
    )


# --------------------------------------------------------------------------
# Exemplars across gunicorn workers


def test_exemplars_from_both_gunicorn_workers_reach_prometheus(tmp_path: Path) -> None:
    """A real Prometheus with exemplar storage scrapes a 2-worker gunicorn
    (multiprocess mode, spans sampled): ``query_exemplars`` returns trace ids
    of requests served by each of the two workers."""
    from tests.servers import start_gunicorn

    binary = require_tool("prometheus")
    (tmp_path / "gunicorn").mkdir()
    gunicorn = start_gunicorn(
        tmp_path / "gunicorn", SIGTRACE_TRACING="true", SIGTRACE_CONSOLE_SPANS="true"
    )
    try:
        _check_exemplars_of_both_workers(binary, gunicorn, tmp_path)
    finally:
        gunicorn.stop()


def _check_exemplars_of_both_workers(binary: str, gunicorn: t.Any, tmp_path: Path) -> None:
    config = scraping("gunicorn", gunicorn.port)
    with running_prometheus(binary, tmp_path, tmp_path / "prometheus", config) as (proc, server):
        served: dict[str, int] = {}  # trace id -> pid of the worker that served it
        stop_load = threading.Event()

        def load(client: int) -> None:
            # Two clients at once keep both sync workers serving.
            for i in range(100_000):
                if stop_load.wait(0.05):
                    return
                answer = gunicorn.signup(f"prom{client}-{i}")
                served[answer["trace_id"]] = answer["pid"]

        loaders = [threading.Thread(target=load, args=(c,), daemon=True) for c in range(2)]
        for loader in loaders:
            loader.start()
        workers_seen: set[int] = set()
        try:

            def from_both_workers() -> bool:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                now = time.time()
                try:
                    series = server.get(
                        "/api/v1/query_exemplars",
                        query='sigtrace_http_request_duration_seconds_bucket{job="gunicorn"}',
                        start=str(now - 120),
                        end=str(now),
                    )
                except OSError:
                    return False  # not up yet
                for entry in series:
                    for exemplar in entry["exemplars"]:
                        trace_id = exemplar["labels"]["trace_id"]
                        assert TRACE_ID.match(trace_id), exemplar
                        if trace_id in served:
                            workers_seen.add(served[trace_id])
                return len(workers_seen) == 2

            try:
                wait_for("exemplars of both workers' traces", from_both_workers, DATA_TIMEOUT)
            except AssertionError as error:
                pids = sorted(served.values())
                by_worker = {pid: pids.count(pid) for pid in set(pids)}
                raise AssertionError(f"{error}; seen {workers_seen}, served {by_worker}") from None
        finally:
            stop_load.set()
            for loader in loaders:
                loader.join(HTTP_TIMEOUT + 5)
    assert len(set(served.values())) == 2


def test_the_multiprocess_errors_alert_goes_pending_on_a_gunicorn_servers_failures(
    tmp_path: Path, servers: list[Server]
) -> None:
    """A real 2-worker gunicorn whose directory holds a corrupt file of a live
    process (this one): every scrape meets it. Prometheus scrapes the server's
    total of failures, records it by reason, and SigtraceMultiprocessErrors
    goes pending (it fires only after 5 minutes)."""
    binary = require_tool("prometheus")
    measured = {r.get("record") or r["alert"] for r in rules("expr")} - {
        r.get("record") or r["alert"] for r in demo_rules("expr")
    }
    assert measured == {"sigtrace:multiprocess_errors:increase10m", "SigtraceMultiprocessErrors"}
    gunicorn = start_gunicorn(tmp_path, SIGTRACE_PUBLISH_INTERVAL="0.2")
    servers.append(gunicorn)
    gunicorn.load_every_worker(10)
    (gunicorn.prometheus_dir / f"sigtrace-{os.getpid()}-0badf11e.json").write_text("{not json")
    config = scraping("gunicorn", gunicorn.port, rules=True)
    work = tmp_path / "prometheus-server"  # "prometheus" is gunicorn's directory
    work.mkdir()
    with running_prometheus(binary, work, work / "data", config) as (proc, server):
        pending = 'ALERTS{alertname="SigtraceMultiprocessErrors", alertstate="pending"}'
        found: dict[str, list[dict[str, t.Any]]] = {}

        def measured_and_pending() -> bool:
            assert proc.poll() is None, (work / "prometheus.log").read_text()
            try:
                for expr in ("sigtrace:multiprocess_errors:increase10m", pending):
                    found[expr] = server.query(expr)
            except (OSError, ValueError):
                return False  # not ready yet
            return all(found.values())

        wait_for("the alert to go pending", measured_and_pending, START_TIMEOUT + DATA_TIMEOUT)
    (recorded,) = found["sigtrace:multiprocess_errors:increase10m"]
    assert recorded["metric"] == {
        "__name__": "sigtrace:multiprocess_errors:increase10m",
        "job": "gunicorn",
        "reason": "invalid_json",
    }
    assert float(recorded["value"][1]) >= 1
    (alert,) = found[pending]
    assert alert["metric"]["reason"] == "invalid_json" and alert["metric"]["job"] == "gunicorn"
