"""The signals page in a real browser: Debian's Chromium, headless, via Selenium.

The demo's signup app (tests/apps/ui_app.py) runs in a subprocess with
``SIGTRACE_UI`` and a metrics token; the test drives traffic, scrapes
``/metrics`` and checks that the page shows the same counts, sorts, marks the
failing receiver, shows HTML names as text and refuses a request without the
token. It saves a screenshot (``UI_SCREENSHOT=path``, which ``make screenshot``
sets to the README's image).

chromium and chromium-driver come from Debian (``.ci/run`` installs them);
Selenium is given both paths, so its Selenium Manager never downloads anything.
"""

from __future__ import annotations

import os
import re
import threading
import typing as t
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tests.app_process import RunningApp, run_module
from tests.apps.ui_app import HOSTILE_RECEIVER, HOSTILE_SIGNAL
from tests.conftest import require_tool
from tests.test_export import app_env

TOKEN = "ui-browser-test-token"
TRACE_URL = "http://traces.example/trace/{trace_id}"
WAIT = 30.0  # seconds for the page to load and draw
TRAFFIC = (
    *(["/signup/ada", "/signup/grace", "/signup/linus"] * 6),
    *(["/async-signup/ken"] * 5),
    *(["/process/job-1", "/process/job-2"] * 3),
    "/boom",
    "/boom",
    "/health",
    "/no-such-page",
    "/hostile",
)
AUDIT = "examples.signup_app.write_audit_log"
NEVER_CALLED = "tests.apps.ui_app._never_called"


def _open(app: RunningApp, path: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{app.port}{path}", headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _receiver_counts(scrape: str) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """Calls and errors per (signal, receiver) in a /metrics scrape."""
    calls: dict[tuple[str, str], int] = {}
    errors: dict[tuple[str, str], int] = {}
    for family in text_string_to_metric_families(scrape):
        for s in family.samples:
            if s.name == "sigtrace_receiver_duration_seconds_count":
                calls[(s.labels["signal"], s.labels["receiver"])] = int(s.value)
            elif s.name == "sigtrace_receiver_errors_total":
                key = (s.labels["signal"], s.labels["receiver"])
                errors[key] = errors.get(key, 0) + int(s.value)
    return calls, errors


@pytest.fixture
def chrome() -> Iterator[t.Any]:
    options = Options()
    options.binary_location = require_tool("chromium", "chromium chromium-driver")
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1440,1700",
        "--force-device-scale-factor=1",
        "--proxy-server=direct://",
    ):
        options.add_argument(argument)
    service = Service(executable_path=require_tool("chromedriver", "chromium chromium-driver"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_loaded(driver: t.Any, times: int = 1) -> None:
    """Wait (polling, bounded) until the page has drawn data ``times`` times."""
    WebDriverWait(driver, WAIT, poll_frequency=0.1).until(
        lambda d: (
            int(d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") or 0) >= times
        )
    )


def _live(driver: t.Any, on: bool) -> None:
    """Turn the page's refresh on or off: while off, nothing is redrawn under the
    test's feet (a redraw replaces the elements it holds)."""
    box = driver.find_element(By.ID, "live")
    if box.is_selected() != on:
        box.click()


def _table(driver: t.Any) -> list[dict[str, t.Any]]:
    rows = []
    for tr in driver.find_elements(By.CSS_SELECTOR, "#receivers tbody tr"):
        cells = tr.find_elements(By.TAG_NAME, "td")
        rows.append(
            {
                "signal": tr.get_attribute("data-signal"),
                "receiver": tr.get_attribute("data-receiver"),
                "class": tr.get_attribute("class"),
                "receiver_text": cells[1].text,
                "calls": int(cells[2].text),
                "errors": int(cells[4].text),
            }
        )
    return rows


def test_the_page_in_chromium(chrome: t.Any, tmp_path: Path) -> None:
    env = app_env(SIGTRACE_UI="1", SIGTRACE_METRICS_TOKEN=TOKEN, SIGTRACE_TRACE_URL=TRACE_URL)
    with run_module("tests.apps.ui_app", env) as app:
        for path in TRAFFIC:
            app.get(path)
        page = f"http://127.0.0.1:{app.port}/sigtrace"

        # Refused without the token, in the browser and for the data it fetches.
        chrome.get(page)
        assert "unauthorized" in chrome.find_element(By.TAG_NAME, "body").text
        assert _open(app, "/sigtrace/data.json")[0] == 401
        assert _open(app, "/sigtrace/data.json", token="wrong")[0] == 401

        status, scrape = _open(app, "/metrics", token=TOKEN)
        assert status == 200
        calls, errors = _receiver_counts(scrape)
        assert errors.get(("user-signed-up", AUDIT), 0) > 0  # the seeded run has failures

        # Every request the browser makes from now on carries the token.
        chrome.execute_cdp_cmd("Network.enable", {})
        chrome.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {TOKEN}"}}
        )
        chrome.get(page)
        _wait_loaded(chrome)
        _live(chrome, False)  # the next refresh is due in seconds: none is in flight

        # The map: every receiver with the count /metrics reports.
        drawn = {
            (g.get_attribute("data-signal"), g.get_attribute("data-receiver")): g
            for g in chrome.find_elements(By.CSS_SELECTOR, "#map g.receiver")
        }
        for key, count in calls.items():
            assert key in drawn, f"{key} missing from the map"
            assert drawn[key].get_attribute("data-calls") == str(count)
            assert f"{count} calls" in drawn[key].text
        for demo_receiver in (
            "examples.signup_app.Mailer.send_welcome_email",
            "examples.signup_app.UserCounter.on_signup",
            AUDIT,
        ):
            assert ("user-signed-up", demo_receiver) in drawn
        assert ("async-user-signed-up", "examples.signup_app.notify_crm") in drawn
        idle = drawn[("user-signed-up", NEVER_CALLED)]
        assert idle.get_attribute("data-state") == "idle"
        assert "not called yet" in idle.text
        failing = drawn[("user-signed-up", AUDIT)]
        assert failing.get_attribute("data-state") == "failing"
        assert "failing" in failing.get_attribute("class")

        # The table: the same counts and errors, the failing receiver marked.
        rows = {(r["signal"], r["receiver"]): r for r in _table(chrome)}
        for key, count in calls.items():
            assert rows[key]["calls"] == count
            assert rows[key]["errors"] == errors.get(key, 0)
        assert "failing" in rows[("user-signed-up", AUDIT)]["class"]
        assert rows[("user-signed-up", AUDIT)]["receiver_text"] == AUDIT + "failing"
        assert rows[("user-signed-up", NEVER_CALLED)]["calls"] == 0

        # Sorting by any column, both ways.
        def header(label: str) -> t.Any:
            return chrome.find_element(
                By.XPATH, f"//table[@id='receivers']//th[normalize-space()='{label}']"
            )

        header("receiver").click()
        names = [r["receiver"] for r in _table(chrome)]
        assert names == sorted(names)
        assert header("receiver").get_attribute("aria-sort") == "ascending"
        header("receiver").click()
        assert [r["receiver"] for r in _table(chrome)] == sorted(names, reverse=True)
        header("calls").click()
        counts = [r["calls"] for r in _table(chrome)]
        assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
        header("calls").click()
        assert [r["calls"] for r in _table(chrome)] == sorted(counts)
        assert header("calls").get_attribute("aria-sort") == "ascending"
        header("errors").click()
        assert _table(chrome)[0]["receiver"] == AUDIT

        # Names from user code are text: shown as written, never run.
        hostile_row = rows[(HOSTILE_SIGNAL, f"user.{HOSTILE_RECEIVER}")]
        assert hostile_row["receiver_text"] == f"user.{HOSTILE_RECEIVER}"
        map_text = chrome.find_element(By.ID, "map").text
        assert HOSTILE_SIGNAL[:30] in map_text
        assert chrome.execute_script("return window.hostile === undefined")
        assert not chrome.find_elements(By.CSS_SELECTOR, "main script, main img")

        # Slow sends: span trees with the slowest receiver marked and a trace link.
        sends = chrome.find_elements(By.CSS_SELECTOR, "#recent .send")
        assert sends
        link = sends[0].find_element(By.TAG_NAME, "a").get_attribute("href")
        assert re.fullmatch(r"http://traces\.example/trace/[0-9a-f]{32}", link)
        slowest = [
            send.find_element(By.CSS_SELECTOR, "li.slowest").text
            for send in sends
            if send.get_attribute("data-signal") == "user-signed-up"
        ]
        # The welcome email (2-8 ms) outlasts the other two receivers.
        assert any("Mailer.send_welcome_email" in t and "slowest" in t for t in slowest), slowest

        # Requests by endpoint, with the unhandled exception.
        endpoints = chrome.find_element(By.ID, "endpoints").text
        assert "GET boom" in endpoints and "ZeroDivisionError \u00d7 2" in endpoints

        # The screenshot, with live traffic so rates show (after two refreshes).
        stop = threading.Event()

        def traffic() -> None:
            index = 0
            while not stop.wait(0.05):
                app.get(TRAFFIC[index % (len(TRAFFIC) - 1)])  # not /hostile again
                index += 1

        runner = threading.Thread(target=traffic, daemon=True)
        runner.start()
        try:
            header("calls").click()  # busiest first
            loaded = int(chrome.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
            _live(chrome, True)  # loads at once, then every refresh interval
            _wait_loaded(chrome, loaded + 2)
            target = Path(os.environ.get("UI_SCREENSHOT") or tmp_path / "ui.png")
            target.parent.mkdir(parents=True, exist_ok=True)
            assert chrome.save_screenshot(str(target))
            assert target.read_bytes().startswith(b"\x89PNG")
        finally:
            stop.set()
            runner.join(timeout=10)


def test_the_page_stays_usable_with_500_signals_and_5000_receivers(
    chrome: t.Any, registry: CollectorRegistry
) -> None:
    import blinker
    import flask
    from werkzeug.serving import make_server

    from sigtrace import SigTrace

    namespace = blinker.Namespace()
    keep: list[t.Any] = []
    for i in range(500):
        signal = namespace.signal(f"scale-signal-{i:03d}")
        for j in range(10):

            def receiver(sender: t.Any, **kwargs: t.Any) -> None:
                return None

            receiver.__qualname__ = f"receiver_{i:03d}_{j}"
            signal.connect(receiver)
            keep.append(receiver)
        keep.append(signal)
    app = flask.Flask("ui-scale")
    app.config.update(SIGTRACE_UI=True, SIGTRACE_TRACING=False, SIGTRACE_MAX_LABEL_VALUES=6000)
    ext = SigTrace(app, registry=registry)
    signals = [s for s in keep if isinstance(s, blinker.Signal)]
    for index, signal in enumerate(signals):
        for _ in range(1 + index % 3):
            signal.send(app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        chrome.get(f"http://127.0.0.1:{server.server_port}/sigtrace")
        _wait_loaded(chrome)
        _live(chrome, False)
        # (Other live signals of the test process are listed too: the filter keeps ours.)
        search = chrome.find_element(By.ID, "filter")
        search.send_keys("scale-signal-")
        # The busiest 40 signals are drawn, and the table's first 300 rows, with a way to all.
        assert len(chrome.find_elements(By.CSS_SELECTOR, "#map g.signal")) == 40
        assert len(chrome.find_elements(By.CSS_SELECTOR, "#map g.receiver")) == 400
        busiest = [
            g.get_attribute("data-signal")
            for g in chrome.find_elements(By.CSS_SELECTOR, "#map g.signal")
        ]
        assert all(int(name[-3:]) % 3 == 2 for name in busiest)  # those sent 3 times
        assert "show all 500 signals" in chrome.find_element(By.ID, "map-more").text
        assert len(chrome.find_elements(By.CSS_SELECTOR, "#receivers tbody tr")) == 300
        assert "show all 5000" in chrome.find_element(By.ID, "table-more").text
        # The filter narrows the map and the table to what matches.
        search.send_keys("123")
        drawn = chrome.find_elements(By.CSS_SELECTOR, "#map g.receiver")
        assert {g.get_attribute("data-signal") for g in drawn} == {"scale-signal-123"}
        rows = _table(chrome)
        assert len(rows) == 10 and {r["signal"] for r in rows} == {"scale-signal-123"}
        assert all(r["calls"] == 1 + 123 % 3 for r in rows)
        # Everything, on demand.
        for _ in "123":
            search.send_keys(Keys.BACKSPACE)
        chrome.find_element(By.CSS_SELECTOR, "#table-more button").click()
        assert len(chrome.find_elements(By.CSS_SELECTOR, "#receivers tbody tr")) == 5000
        chrome.find_element(By.CSS_SELECTOR, "#map-more button").click()
        assert len(chrome.find_elements(By.CSS_SELECTOR, "#map g.receiver")) == 5000
    finally:
        server.shutdown()
        serving.join(timeout=10)
        ext.close()
