"""The Prometheus rules of grafana/rules: valid, unit-tested with promtool, documented.

``promtool test rules`` runs the unit tests of ``grafana/rules/tests``: each
alert goes pending then fires with exact labels and annotations, stays silent
without traffic, and the ratio alerts respect their minimum-traffic guard. A
copy of the rules without those guards must fail the same tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import typing as t
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.conftest import generate, needs_generator, require_tool

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "grafana" / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
TEST_FILES = sorted((RULES_DIR / "tests").glob("*.yml"))
RUNBOOK = RULES_DIR / "RUNBOOK.md"
ALERTS = {
    "SigtraceUnhandledExceptions",
    "SigtraceUnhandledExceptionRatioHigh",
    "SigtraceReceiverErrors",
    "SigtraceSlowReceiver",
    "SigtraceMultiprocessErrors",
}
GUARD = re.compile(r"\n\s*and on \([^)]*\)\n\s*sigtrace:\w+:rate5m >= [0-9.]+")


def rules(kind: str) -> list[dict[str, t.Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
        if kind in rule
    ]


def alert(name: str) -> dict[str, t.Any]:
    (found,) = [rule for rule in rules("alert") if rule["alert"] == name]
    return found


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def alert_tests() -> list[dict[str, t.Any]]:
    return [
        case
        for path in TEST_FILES
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]
        for case in test.get("alert_rule_test", [])
    ]


# --------------------------------------------------------------------------
# promtool


def test_promtool_check_rules_accepts_every_rule_file() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    counts = [int(n) for n in re.findall(r"SUCCESS: (\d+) rules found", result.stdout)]
    assert sum(counts) == len(rules("expr")) >= 12


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda path: path.name)
def test_promtool_unit_tests_pass(test_file: Path) -> None:
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_catch_a_missing_traffic_guard(tmp_path: Path) -> None:
    """Without the minimum-traffic guards, the guard test cases fail."""
    require_tool("promtool")
    copy = tmp_path / "rules"
    shutil.copytree(RULES_DIR, copy)
    alerts = copy / "sigtrace-alerts.yml"
    text, removed = GUARD.subn("", alerts.read_text())
    assert removed == 3
    alerts.write_text(text)
    result = promtool("test", "rules", *(str(copy / "tests" / p.name) for p in TEST_FILES))
    assert result.returncode == 1, result.stdout
    report = result.stdout + result.stderr  # promtool prints failures on stderr
    failed = set(re.findall(r"name: ([^,\n]+),\n\s+alertname: (\w+)", report))
    assert failed == {
        ("the ratio alert needs a minimum of traffic", "SigtraceUnhandledExceptionRatioHigh"),
        ("receiver errors need a minimum of calls", "SigtraceReceiverErrors"),
        ("a slow receiver needs a minimum of calls", "SigtraceSlowReceiver"),
    }, report


def test_the_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    require_tool("promtool")
    copy = tmp_path / "rules"
    shutil.copytree(RULES_DIR, copy)
    alerts = copy / "sigtrace-alerts.yml"
    text = alerts.read_text()
    # A slow receiver at 1 s instead of 500 ms: the 995 ms receiver no longer fires.
    slower = "round(sigtrace:receiver_duration_seconds:p99_rate5m, 0.001) > 1\n"
    alerts.write_text(text.replace(slower.replace("> 1", "> 0.5"), slower))
    result = promtool("test", "rules", str(copy / "tests" / "sigtrace-receivers.test.yml"))
    assert result.returncode == 1
    assert "alertname: SigtraceSlowReceiver, time: 15m" in result.stderr


# --------------------------------------------------------------------------
# What the rules say


def test_recording_rules_follow_the_naming_convention() -> None:
    records = rules("record")
    names = [rule["record"] for rule in records]
    assert len(names) == len(set(names))
    for rule in records:
        assert re.fullmatch(r"sigtrace:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]
        window = re.search(r"(?:rate|increase)(\d+m)$", rule["record"])
        assert window and f"[{window.group(1)}]" in rule["expr"], rule["record"]
        # Aggregated per job, never per instance: alerts are per service.
        assert "by (job," in rule["expr"] and "instance" not in rule["expr"]
    assert {
        "sigtrace:http_request_exceptions:ratio_rate5m",
        "sigtrace:receiver_errors:ratio_rate5m",
    } <= set(names)


def test_the_alerts_and_what_they_compare() -> None:
    assert {rule["alert"] for rule in rules("alert")} == ALERTS
    assert (
        "sigtrace:http_request_exceptions:rate5m * 60, 0.1) > 1"
        in alert("SigtraceUnhandledExceptions")["expr"]
    )
    for name, ratio, guard in (
        (
            "SigtraceUnhandledExceptionRatioHigh",
            "sigtrace:http_request_exceptions:ratio_rate5m, 0.001) > 0.05",
            "and on (job, endpoint)\nsigtrace:http_requests:rate5m >= 0.1",
        ),
        (
            "SigtraceReceiverErrors",
            "sigtrace:receiver_errors:ratio_rate5m, 0.001) > 0.05",
            "and on (job, signal, receiver)\nsigtrace:receiver_calls:rate5m >= 0.1",
        ),
        (
            "SigtraceSlowReceiver",
            "sigtrace:receiver_duration_seconds:p99_rate5m, 0.001) > 0.5",
            "and on (job, signal, receiver)\nsigtrace:receiver_calls:rate5m >= 0.1",
        ),
    ):
        assert ratio in alert(name)["expr"] and guard in alert(name)["expr"], name


def test_every_alert_waits_has_a_severity_and_says_what_to_do() -> None:
    headings = {
        line[3:].strip().lower()
        for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
        if line.startswith("## ")
    }
    for rule in rules("alert"):
        assert re.fullmatch(r"\d+m", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert "{{ $labels.job }}" in notes["summary"]
        assert "{{ $value" in notes["description"]
        url, anchor = notes["runbook_url"].split("#")
        if generate is not None:  # the generator is importable on Python >= 3.11
            assert url == generate.DEFAULT_RUNBOOK_URL, rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in headings, rule["alert"]
    assert alert("SigtraceUnhandledExceptionRatioHigh")["labels"]["severity"] == "critical"


def test_every_alert_is_tested_firing_and_silent() -> None:
    cases = alert_tests()
    for name in ALERTS:
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} never tested firing"
        assert any(not case["exp_alerts"] for case in mine), f"{name} never tested silent"
        for case in mine:
            for expected in case["exp_alerts"]:
                assert set(expected["exp_annotations"]) == {
                    "summary",
                    "description",
                    "runbook_url",
                }
                assert expected["exp_labels"]["severity"] == alert(name)["labels"]["severity"]


def test_the_unit_tests_load_every_rule_file() -> None:
    for path in TEST_FILES:
        listed = yaml.safe_load(path.read_text(encoding="utf-8"))["rule_files"]
        assert sorted((path.parent / name).resolve() for name in listed) == [
            p.resolve() for p in RULE_FILES
        ]


# --------------------------------------------------------------------------
# runbook_url: absolute, from one setting


def runbook_urls(directory: Path) -> list[str]:
    """Every runbook_url of the alert rules and of the promtool expectations."""
    found = []
    for path in [*sorted(directory.glob("*.yml")), *sorted((directory / "tests").glob("*.yml"))]:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in document.get("groups", []):
            found += [r["annotations"]["runbook_url"] for r in group["rules"] if "alert" in r]
        for test in document.get("tests", []):
            for case in test.get("alert_rule_test", []):
                found += [a["exp_annotations"]["runbook_url"] for a in case["exp_alerts"]]
    return found


def assert_absolute_http_urls(urls: list[str]) -> None:
    assert len(urls) >= 2 * len(ALERTS), urls
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        assert parts.scheme in ("http", "https") and parts.netloc, f"not absolute: {url}"
        assert parts.fragment, f"no section anchor: {url}"


def test_every_runbook_url_is_an_absolute_http_url() -> None:
    assert_absolute_http_urls(runbook_urls(RULES_DIR))


@needs_generator
def test_the_committed_rules_are_filled_from_the_default_runbook_url() -> None:
    for name, text in generate.rules_with_runbook(RULES_DIR, generate.DEFAULT_RUNBOOK_URL).items():
        assert (RULES_DIR / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: run python -m grafana.generate"
        )


@needs_generator
def test_one_setting_points_every_runbook_url_elsewhere_and_the_rules_still_pass(
    tmp_path: Path,
) -> None:
    """RUNBOOK_URL set for the generator: every alert and every promtool
    expectation links into that page, and ``promtool test rules`` passes."""
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    url = "https://wiki.example.org/ops/sigtrace-runbook"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "grafana.generate"),
            *("--out", str(tmp_path / "dashboards"), "--rules-dir", str(rules_dir)),
        ],
        cwd=ROOT,
        env={**os.environ, generate.RUNBOOK_URL_VARIABLE: url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    urls = runbook_urls(rules_dir)
    assert_absolute_http_urls(urls)
    assert all(u.startswith(url + "#sigtrace") for u in urls), urls
    tests = sorted(str(p.relative_to(rules_dir)) for p in (rules_dir / "tests").glob("*.yml"))
    checked = promtool("test", "rules", *tests, cwd=rules_dir)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_generator
@pytest.mark.parametrize("url", ["grafana/rules/RUNBOOK.md", "ftp://host/x", "https://h/x#a"])
def test_a_runbook_url_that_is_not_absolute_http_is_refused(url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grafana.generate", "--check", "--runbook-url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "RUNBOOK_URL=" in result.stderr, result.stderr
