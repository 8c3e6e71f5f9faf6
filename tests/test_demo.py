"""``make demo``: the demo process as a user runs it (a subprocess on 127.0.0.1)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.test_export import app_env

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 60.0


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.demo", *args],
        cwd=ROOT,
        env=app_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def run_demo_scraping(*args: str) -> tuple[str, str, str]:
    """Run the demo; scrape its /metrics once a tree is printed. stdout, stderr, scrape."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.demo", *args],
        cwd=ROOT,
        env=app_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    scraped = ""
    try:
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if found:
                base = found.group(1)
            if not scraped and line.startswith("└── signal user-signed-up"):
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(base + "/metrics", timeout=10) as response:
                    scraped = response.read().decode()
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    stderr = proc.stderr.read() if proc.stderr else ""
    return "".join(lines), stderr, scraped


def test_demo_prints_span_trees_and_a_slowest_receivers_table() -> None:
    stdout, stderr, scraped = run_demo_scraping(
        "--port", "0", "--duration", "4", "--traffic-rps", "25", "--table-every", "1"
    )
    # a request's tree: server span, its signal, three receivers, the slowest marked
    tree = re.search(
        r"^GET /signup/<name> +SERVER +[\d.]+ ms.*\n"
        r"└── signal user-signed-up +INTERNAL +[\d.]+ ms +blinker\.receivers\.called=3\n"
        r"((?:    [├└]── receiver \S+ +INTERNAL +[\d.]+ ms.*\n){3})",
        stdout,
        re.MULTILINE,
    )
    assert tree, stdout[:3000]
    receivers = tree.group(1)
    assert "examples.signup_app.Mailer.send_welcome_email" in receivers
    assert receivers.count("◀ slowest") == 1
    # the table from the metrics: header and the slow receiver's row with its calls
    assert "slowest receivers at" in stdout
    row = re.search(
        r"^examples\.signup_app\.Mailer\.send_welcome_email +(\d+) +[\d.]+ (ms|µs) +"
        r"[\d.]+ (ms|µs) +(\d+)$",
        stdout,
        re.MULTILINE,
    )
    assert row and int(row.group(1)) > 0, stdout[-2000:]
    # /metrics is served, no access log, no tracebacks
    assert "sigtrace_receiver_duration_seconds_bucket" in scraped
    assert 'HTTP/1.1" 200' not in stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert "[span]" not in stdout


def test_raw_spans_flag_prints_one_line_per_span() -> None:
    result = run_demo(
        "--raw-spans", "--port", "0", "--duration", "2", "--traffic-rps", "25", "--table-every", "0"
    )
    assert result.returncode == 0, result.stderr
    raw = [line for line in result.stdout.splitlines() if line.startswith("[span] ")]
    assert any("'signal user-signed-up' INTERNAL" in line for line in raw), result.stdout[:2000]
    assert "└──" not in result.stdout


def test_a_busy_port_gets_one_line_saying_how() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_demo("--port", str(port), "--duration", "1")
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert f"port {port} on 127.0.0.1 is busy" in line
    assert f"make demo PORT={port + 1}" in line and f"--port {port + 1}" in line


def test_make_demo_passes_port_and_args() -> None:
    result = subprocess.run(
        ["make", "-n", "demo", "PORT=8123", "DEMO_ARGS=--raw-spans"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert "-m examples.demo --port 8123 --raw-spans" in result.stdout
