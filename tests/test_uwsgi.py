"""Real uWSGI (from PyPI) under ``PROMETHEUS_MULTIPROC_DIR``: exact totals.

uWSGI loads the app in its master and forks workers from C, where Python's
fork hooks do not run: each worker publishes the values it copied from the
master under the master's name (so they count once), then drops them. Without
``--enable-threads`` / ``--threads`` no publisher thread runs and values are
published at the end of requests (at most once per interval) and at exit.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from sigtrace import multiprocess_directory as mpd
from tests.servers import BOOT_SENDS, TOTALS, Server, start_uwsgi

if sys.platform == "win32":  # pragma: no cover
    pytest.skip("uWSGI does not run on Windows", allow_module_level=True)
if not Path(sys.executable).with_name("uwsgi").exists():
    pytest.fail("uwsgi is a dev dependency: pip install -e '.[dev]'")


def test_processes_and_threads_total_every_request(tmp_path: Path, servers: list[Server]) -> None:
    uwsgi = start_uwsgi(tmp_path, "--processes", "2", "--threads", "4")
    servers.append(uwsgi)
    n = 300
    pids = uwsgi.load(n, threads=12)
    assert len(set(pids)) == 2
    uwsgi.wait_for_totals(n)
    samples = uwsgi.scrape()
    # The app was imported once, in the master; its send counts once, though
    # both workers published the master's values before dropping their copies.
    assert samples[BOOT_SENDS] == 1
    uwsgi.stop(signal.SIGTERM)
    assert uwsgi.directory_totals() == [n] * len(TOTALS)


def test_without_threads_reloaded_workers_lose_nothing(
    tmp_path: Path, servers: list[Server]
) -> None:
    """No thread: values go out at requests' ends and at exit. Each worker is
    reloaded gracefully (SIGHUP to a worker: what uWSGI's own recycling
    options do), the dead workers' files are archived by a scrape, and after a
    graceful stop the directory holds exact totals."""
    uwsgi = start_uwsgi(tmp_path, "--processes", "2")
    servers.append(uwsgi)
    first = set(uwsgi.load(100, threads=4))
    assert len(first) == 2
    for pid in first:
        os.kill(pid, signal.SIGHUP)  # a worker of this server, by pid
    uwsgi.wait_for_log(r"Respawned uWSGI worker \d+", count=2)
    second = set(uwsgi.load(100, threads=4, prefix="after"))
    assert not second & first
    uwsgi.scrape()  # archives the reloaded workers' files
    files = uwsgi.files()
    assert not any(f.startswith(f"sigtrace-{pid}-") for pid in first for f in files), files
    assert mpd.ARCHIVE_NAME in files
    uwsgi.stop(signal.SIGTERM)  # graceful: every worker publishes at exit
    assert uwsgi.directory_totals() == [200] * len(TOTALS)


def test_files_of_an_earlier_run_are_named_in_a_startup_warning(
    tmp_path: Path, servers: list[Server]
) -> None:
    """uWSGI runs no hook that could clear the directory: the master warns."""
    first = start_uwsgi(tmp_path, "--processes", "2")
    servers.append(first)
    first.load(10, threads=2)
    first.stop(signal.SIGTERM)
    left = sorted(f for f in first.files() if f.startswith("sigtrace-"))
    assert left
    second = start_uwsgi(tmp_path, "--processes", "2", prometheus_dir=first.prometheus_dir)
    servers.append(second)
    (warning,) = second.wait_for_log(r"holds \d+ file\(s\) of an earlier server run \(([^)]*)\)")
    assert set(warning.group(1).split(", ")) <= set(left)
    assert "Empty the directory before each start" in warning.string


def test_bad_entries_and_a_corrupt_archive_are_skipped(
    tmp_path: Path, servers: list[Server]
) -> None:
    from tests.test_multiprocess import dead_pid
    from tests.test_multiprocess_server_faults import error_count, plant_bad_entries

    uwsgi = start_uwsgi(tmp_path, "--processes", "2", "--threads", "2")
    servers.append(uwsgi)
    (uwsgi.prometheus_dir / mpd.ARCHIVE_NAME).write_text("{corrupt")
    plant_bad_entries(uwsgi.prometheus_dir, uwsgi.proc.pid)  # "alive": read at every scrape
    plant_bad_entries(uwsgi.prometheus_dir, dead_pid())  # set aside by a scrape's archiving
    uwsgi.load(60, threads=4)
    uwsgi.wait_for_totals(60)
    samples = uwsgi.scrape()
    assert error_count(samples, "invalid_json") >= 1 and error_count(samples, "not_regular") >= 1
    assert any(".corrupt-" in name for name in uwsgi.files())
    uwsgi.stop(signal.SIGTERM)
    assert uwsgi.directory_totals() == [60] * len(TOTALS)
