"""Shared fixtures: a fresh registry and instrumentation per test, real components."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import sigtrace
from sigtrace import dispatch

if t.TYPE_CHECKING:
    from tests.servers import Server  # which imports this module


def require_tool(name: str, packages: str = "prometheus docker-compose") -> str:
    """Path of an external tool; skip without it, fail under STRICT_REAL_COMPONENTS."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} is not installed: install Debian's package "
            f"(apt-get install --no-install-recommends {packages})"
        )
        if os.environ.get("STRICT_REAL_COMPONENTS"):
            pytest.fail(message + " [STRICT_REAL_COMPONENTS is set, so this cannot skip]")
        pytest.skip(message)
    return path


@pytest.fixture
def clean_otel_context() -> Iterator[None]:
    """Run in an empty OpenTelemetry context and restore the caller's afterwards,
    even if a span was left attached (a leak must not spill into other tests)."""
    token = otel_context.attach(Context())
    yield
    otel_context.detach(token)


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A fresh registry with sigtrace instrumented into it for the test."""
    while dispatch.is_instrumented():
        dispatch.uninstrument()
    reg = CollectorRegistry()
    yield reg
    while dispatch.is_instrumented():
        dispatch.uninstrument()


@pytest.fixture
def instrumented(registry: CollectorRegistry) -> Iterator[CollectorRegistry]:
    sigtrace.instrument(registry=registry)
    yield registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """The value of one sample (by full sample name and exact labels), or None."""
    for family in registry.collect():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def samples_from_text(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a Prometheus text exposition, keyed by name and sorted labels."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def series(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    """Label sets of every sample named ``name``."""
    return [
        dict(s.labels) for family in registry.collect() for s in family.samples if s.name == name
    ]


__all__: list[str] = ["require_tool", "sample", "samples_from_text", "series"]
_ = t


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Append each gunicorn or uWSGI server a test starts (tests/servers.py): they
    are stopped after the test, however it ends."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every few bytecodes, so sends really interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def run_threads(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(index)`` in ``count`` threads started together; re-raise failures."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            work(index)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
    if errors:
        raise errors[0]


# The dashboard generator (grafana/generate.py) and the tests that run it.
try:
    from grafana import generate
except ModuleNotFoundError as error:
    # grafana-foundation-sdk requires Python >= 3.11, so the dev extra installs
    # it only there. Only then may the generator's tests skip; everywhere else a
    # missing SDK is an error. The committed JSON is checked on every version.
    if sys.version_info >= (3, 11) or not (error.name or "").startswith("grafana_foundation_sdk"):
        raise
    generate = None  # type: ignore[assignment]

GENERATOR_SKIP_REASON = (
    f"grafana-foundation-sdk requires Python >= 3.11 (this is {sys.version.split()[0]}); "
    "the dashboard generator is tested on 3.11+, the committed dashboards here"
)
needs_generator = pytest.mark.skipif(generate is None, reason=GENERATOR_SKIP_REASON)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs, 0700, unmounted after the test."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=64,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)
