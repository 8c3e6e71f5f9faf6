"""The multiprocess directory under faults and hostile users (unit level).

Real files, modes, symlinks, FIFOs, a lock held by another process, and the
scrape read back through prometheus-client's parser. The same faults against
a real gunicorn are in test_multiprocess_server_faults.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sigtrace import ConfigError
from sigtrace import multiprocess_directory as mpd
from sigtrace import multiprocess_format as fmt
from sigtrace import multiprocess_publisher as publishing
from sigtrace.config import load_settings
from sigtrace.metrics import MetricSet
from tests.conftest import samples_from_text
from tests.test_multiprocess import SENDS, dead_pid, files, record, write_as

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown, mount")


@pytest.fixture
def mpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "multiproc"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    return path


@pytest.fixture
def metrics() -> MetricSet:
    return MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))


def scrape(
    path: Path, *, archive: bool = True
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(
        mpd.PublishedTotalsCollector(
            str(path),
            archive=archive,
            before_read=publishing.publish_all,
            local=publishing.local_documents,
        )
    )
    return samples_from_text(generate_latest(registry).decode())


def errors(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], reason: str) -> float:
    return samples.get(("sigtrace_multiprocess_errors_total", (("reason", reason),)), 0.0)


@pytest.fixture(autouse=True)
def fresh_error_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpd, "_errors", mpd._Errors())


def _published(metrics: MetricSet, sends: int) -> publishing.Publisher:
    """This process's publisher of ``metrics``, after ``sends`` sends published."""
    publisher = publishing.attach(metrics, interval=3600)
    assert publisher is not None
    record(metrics, sends)
    assert publisher.publish()
    return publisher


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --------------------------------------------------------------------------
# 1. Private by construction


def test_every_file_is_0600_and_the_directory_0700_whatever_the_umask(
    mpdir: Path, metrics: MetricSet
) -> None:
    old = os.umask(0)  # the most permissive umask: modes come from sigtrace alone
    try:
        publisher = publishing.attach(metrics, interval=3600)
        assert publisher is not None
        record(metrics, 3)
        assert publisher.publish()
        dead = MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))
        record(dead, 2)
        write_as(mpdir, dead_pid(), dead)
        assert mpd.archive_dead(str(mpdir)) == 1
    finally:
        os.umask(old)
    assert files(mpdir) == {publisher.name, mpd.ARCHIVE_NAME, mpd.LOCK_NAME}
    for name in (publisher.name, mpd.ARCHIVE_NAME, mpd.LOCK_NAME):
        assert mode(mpdir / name) == 0o600, name
    assert scrape(mpdir)[SENDS] == 5


def test_a_planted_symlink_is_never_followed(mpdir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim.chmod(0o600)
    dead = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(dead, 4)
    write_as(mpdir, dead_pid(), dead)
    (mpdir / mpd.ARCHIVE_NAME).symlink_to(victim)
    assert mpd.archive_dead(str(mpdir)) == 1
    assert victim.read_text() == "precious" and mode(victim) == 0o600
    assert not (mpdir / mpd.ARCHIVE_NAME).is_symlink()  # replaced, not written through
    assert scrape(mpdir, archive=False)[SENDS] == 4


def test_a_planted_lock_symlink_is_refused_and_nothing_is_lost(mpdir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (mpdir / mpd.LOCK_NAME).symlink_to(victim)
    dead = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(dead, 4)
    write_as(mpdir, dead_pid(), dead)
    samples = scrape(mpdir)  # archiving refuses the lock; reading goes on
    assert samples[SENDS] == 4
    assert errors(samples, "archive_failed") == 1
    assert victim.read_text() == "precious"


def _refused(path: Path, problem: str, dir_mode: int) -> None:
    with pytest.raises(ConfigError) as info:
        publishing.check_at_init(str(path))
    message = str(info.value)
    assert str(path) in message and problem in message
    assert f"mode {dir_mode:04o}" in message and "owner" in message
    assert "chmod 0700" in message and "SIGTRACE_MULTIPROC_ALLOW_SHARED_DIR=true" in message
    publishing.check_at_init(str(path), allow_shared=True)  # the explicit opt-out


@pytest.mark.parametrize("dir_mode", [0o777, 0o1777, 0o770, 0o722])
def test_a_directory_others_can_write_is_refused_with_the_fix(mpdir: Path, dir_mode: int) -> None:
    mpdir.chmod(dir_mode)
    _refused(mpdir, "writable by other users", dir_mode)


@as_root
def test_a_directory_of_another_user_is_refused_by_a_non_root_server(
    mpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.chown(mpdir, NOBODY, -1)
    publishing.check_at_init(str(mpdir))  # root: taken for its workers' user
    # The same directory judged by a server running as uid 1000 (os.access
    # still answers for root, so only the ownership rule is at stake).
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    _refused(mpdir, "owned by another user", 0o700)


def test_the_opt_out_is_a_setting() -> None:
    assert load_settings({"SIGTRACE_MULTIPROC_ALLOW_SHARED_DIR": "true"}).multiproc_allow_shared_dir
    assert not load_settings({}).multiproc_allow_shared_dir


@pytest.mark.parametrize("value", ["0", "0.001", "1e-9", "0.09", "61", "3600", "nan", "inf"])
def test_publish_interval_outside_0_1_to_60_seconds_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match=r"SIGTRACE_PUBLISH_INTERVAL=.*from 0.1 to 60"):
        load_settings({"SIGTRACE_PUBLISH_INTERVAL": value})
    assert load_settings({"SIGTRACE_PUBLISH_INTERVAL": "0.1"}).publish_interval == 0.1
    assert load_settings({"SIGTRACE_PUBLISH_INTERVAL": 60}).publish_interval == 60


# --------------------------------------------------------------------------
# 3. No bad entry stops anything


def _good(mpdir: Path) -> None:
    dead = MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))
    record(dead, 5, [0.05])
    write_as(mpdir, os.getpid(), dead)  # "alive": read, never archived


def _entry(mpdir: Path) -> Path:
    return mpdir / f"sigtrace-{os.getpid()}-{os.urandom(4).hex()}.json"


def _document_with(raw: str) -> str:
    """A valid document whose counter value is the JSON text ``raw``."""
    one = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(one, 1)
    document = json.loads(fmt.encode(fmt.process_document(one, os.getpid())))
    document["families"][0]["series"][0]["value"] = "__VALUE__"
    return json.dumps(document).replace('"__VALUE__"', raw)


BAD_ENTRIES = {
    "wrong_shape": ("invalid_document", lambda p: p.write_text('{"format": 2, "families": 7}')),
    "version_1": ("unsupported_format", lambda p: p.write_text('{"format": 1, "families": []}')),
    "a_list": ("invalid_document", lambda p: p.write_text("[1, 2]")),
    "truncated": ("invalid_json", lambda p: p.write_text('{"format": 2, "fam')),
    "garbage": ("invalid_json", lambda p: p.write_bytes(b"\xff\xfe\x00garbage")),
    "negative": ("invalid_document", lambda p: p.write_text(_document_with("-3.0"))),
    "nan": ("invalid_document", lambda p: p.write_text(_document_with("NaN"))),
    "huge": ("invalid_document", lambda p: p.write_text(_document_with("1e999"))),
    "a_string": ("invalid_document", lambda p: p.write_text(_document_with('"7"'))),
    "a_bad_name": (
        "invalid_document",
        lambda p: p.write_text(_document_with("1").replace("sigtrace_signal_sends", "sigtrace_ x")),
    ),
    "a_directory": ("not_regular", lambda p: p.mkdir()),
    "a_fifo": ("not_regular", lambda p: os.mkfifo(p)),
    "a_dangling_symlink": ("not_regular", lambda p: p.symlink_to(p.parent / "nowhere")),
}


@pytest.mark.parametrize("kind", sorted(BAD_ENTRIES))
def test_a_bad_entry_is_skipped_counted_and_warned_about_once(
    mpdir: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    reason, make = BAD_ENTRIES[kind]
    _good(mpdir)
    bad = _entry(mpdir)
    make(bad)
    with caplog.at_level(logging.WARNING, logger="sigtrace"):
        first = scrape(mpdir)
        second = scrape(mpdir)
    assert first[SENDS] == 5 and second[SENDS] == 5  # the rest is served
    assert errors(second, reason) == errors(first, reason) + 1 >= 2
    warnings = [r.getMessage() for r in caplog.records if bad.name in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0]  # rate-limited: one per minute


def test_a_symlink_to_a_valid_file_is_not_read(mpdir: Path, tmp_path: Path) -> None:
    _good(mpdir)
    outside = tmp_path / "outside.json"
    forged = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(forged, 1_000_000)
    outside.write_bytes(fmt.encode(fmt.process_document(forged, os.getpid())))
    _entry(mpdir).symlink_to(outside)
    samples = scrape(mpdir)
    assert samples[SENDS] == 5 and errors(samples, "not_regular") == 1


@as_root
def test_another_users_file_is_not_read(mpdir: Path) -> None:
    _good(mpdir)
    forged = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(forged, 1_000_000)
    name = write_as(mpdir, os.getpid(), forged)
    os.chown(mpdir / name, NOBODY, -1)
    samples = scrape(mpdir)
    assert samples[SENDS] == 5 and errors(samples, "foreign_owner") == 1


@as_root
def test_a_directory_shared_on_purpose_reads_every_users_files(mpdir: Path) -> None:
    _good(mpdir)
    other = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(other, 2)
    name = write_as(mpdir, os.getpid(), other)
    os.chown(mpdir / name, NOBODY, -1)
    mpdir.chmod(0o1777)
    publishing.check_at_init(str(mpdir), allow_shared=True)
    samples = scrape(mpdir)
    assert samples[SENDS] == 7 and errors(samples, "foreign_owner") == 0


def test_a_value_that_went_down_is_skipped(mpdir: Path) -> None:
    first = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(first, 9)
    name = write_as(mpdir, os.getpid(), first)
    assert scrape(mpdir)[SENDS] == 9
    lower = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(lower, 2)
    (mpdir / name).write_bytes(fmt.encode(fmt.process_document(lower, os.getpid())))
    samples = scrape(mpdir)
    assert SENDS not in samples and errors(samples, "decreased") == 1


def test_a_corrupt_archive_is_renamed_aside_and_the_rest_served(mpdir: Path) -> None:
    _good(mpdir)
    (mpdir / mpd.ARCHIVE_NAME).write_text('{"format": 2, "kind": "archive", "fami')
    samples = scrape(mpdir, archive=False)  # a reader only reports it
    assert samples[SENDS] == 5 and errors(samples, "archive_invalid_json") == 1
    dead = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(dead, 3)
    write_as(mpdir, dead_pid(), dead)
    samples = scrape(mpdir)  # archiving sets it aside and starts a new one
    assert samples[SENDS] == 8
    aside = [n for n in files(mpdir) if n.startswith(mpd.ARCHIVE_NAME + ".corrupt-")]
    assert len(aside) == 1 and (mpdir / aside[0]).read_text().endswith('"fami')
    assert mode(mpdir / mpd.ARCHIVE_NAME) == 0o600


def test_a_corrupt_dead_file_is_renamed_aside_not_archived(mpdir: Path) -> None:
    _good(mpdir)
    bad = mpdir / f"sigtrace-{dead_pid()}-0bad.json"
    bad.write_text("{not json")
    assert mpd.archive_dead(str(mpdir)) == 0
    assert not bad.exists() and any(n.startswith(bad.name + ".corrupt-") for n in files(mpdir))
    assert scrape(mpdir)[SENDS] == 5


# --------------------------------------------------------------------------
# 4. The directory removed, read-only or full at run time


def test_a_removed_directory_is_recreated_0700_and_nothing_counts_twice(
    mpdir: Path, metrics: MetricSet
) -> None:
    publisher = _published(metrics, 2)
    for name in files(mpdir):
        (mpdir / name).unlink()
    mpdir.rmdir()  # a tmp cleaner
    record(metrics, 1)
    assert publisher.publish()
    assert mode(mpdir) == 0o700 and files(mpdir) == {publisher.name}
    assert scrape(mpdir)[SENDS] == 3


def test_a_directory_that_cannot_come_back_serves_this_process_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metrics: MetricSet
) -> None:
    parent = tmp_path / "parent"
    path = parent / "multiproc"
    path.mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    publisher = publishing.attach(metrics, interval=3600)
    assert publisher is not None
    publisher.ensure_started()
    try:
        record(metrics, 4)
        assert publisher.publish()
        (path / publisher.name).unlink()
        path.rmdir()
        parent.rmdir()  # the parent too: it cannot be recreated
        record(metrics, 1)
        assert not publisher.publish()
        samples = scrape(path)
        assert samples[SENDS] == 5  # from memory
        assert errors(samples, "directory_missing") >= 2  # the publish and the read
        path.mkdir(parents=True, mode=0o700)  # back: published again, whole, once
        assert scrape(path)[SENDS] == 5
        assert files(path) == {publisher.name}
    finally:
        publisher.publish_and_stop()


def fill(directory: Path) -> Path:
    """Fill the disk ``directory`` is on; the filler file, to remove."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@as_root
def test_a_full_disk_keeps_values_in_memory_and_logs_what_an_exit_loses(
    small_tmpfs: Path,
    monkeypatch: pytest.MonkeyPatch,
    metrics: MetricSet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(small_tmpfs))
    publisher = publishing.attach(metrics, interval=3600)
    assert publisher is not None
    record(metrics, 3)
    assert publisher.publish()
    filler = fill(small_tmpfs)
    record(metrics, 7)
    with caplog.at_level(logging.WARNING, logger="sigtrace"):
        assert not publisher.publish()
        samples = scrape(small_tmpfs)
    assert samples[SENDS] == 10  # its own values from memory, in place of its stale file
    assert errors(samples, "disk_full") == 2  # this publish and the scrape's
    assert not [n for n in files(small_tmpfs) if n.startswith(".sigtrace-tmp-")]  # cleaned up
    with caplog.at_level(logging.WARNING, logger="sigtrace"):
        publisher.publish_and_stop()
    assert any("7 recorded values are lost" in r.getMessage() for r in caplog.records)
    filler.unlink()  # space again: the next publish writes everything, once
    assert publisher.publish()
    assert scrape(small_tmpfs)[SENDS] == 10


@as_root
def test_a_read_only_directory_keeps_values_in_memory_until_writable_again(
    small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch, metrics: MetricSet
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(small_tmpfs))
    publisher = publishing.attach(metrics, interval=3600)
    assert publisher is not None
    record(metrics, 2)
    assert publisher.publish()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    try:
        record(metrics, 3)
        assert not publisher.publish()
        samples = scrape(small_tmpfs)
        assert errors(samples, "write_denied") >= 1
        assert samples[SENDS] == 5  # its own values from memory, in place of its file
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    assert publisher.publish()
    assert scrape(small_tmpfs)[SENDS] == 5


# --------------------------------------------------------------------------
# 5. No unbounded wait


def test_a_stalled_lock_holder_delays_archiving_by_the_bound_only(mpdir: Path) -> None:
    dead = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(dead, 6)
    name = write_as(mpdir, dead_pid(), dead)
    assert mpd.archive_dead(str(mpdir)) == 1  # creates the lock file
    dead2 = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(dead2, 1)
    name = write_as(mpdir, dead_pid(), dead2)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX);"
            " print('held', flush=True); sys.stdin.read()",
            str(mpdir / mpd.LOCK_NAME),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert mpd.archive_dead(str(mpdir)) == 0  # gave up after LOCK_TIMEOUT
        samples = scrape(mpdir)  # a scrape too: served, and not archived
        assert samples[SENDS] == 7
        assert errors(samples, "lock_timeout") == 2
        assert name in files(mpdir)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)
    assert mpd.archive_dead(str(mpdir)) == 1  # retried later
    assert name not in files(mpdir)


def test_a_reader_waits_for_the_shared_lock_at_most_the_bound(mpdir: Path) -> None:
    (mpdir / mpd.LOCK_NAME).touch(mode=0o600)
    with open(mpdir / mpd.LOCK_NAME) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with (
            pytest.raises(mpd.LockTimeout),
            mpd._locked(str(mpdir), exclusive=False, timeout=0.05),
        ):
            pass


# --------------------------------------------------------------------------
# 6. A new server run starts from zero


def test_files_of_an_earlier_run_are_named_in_a_startup_warning(
    mpdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(old, 1)
    document = json.loads(fmt.encode(fmt.process_document(old, dead_pid())))
    document["run"] = os.getpgrp() + 1  # another server run's process group
    name = f"sigtrace-{document['pid']}-01d.json"
    (mpdir / name).write_text(json.dumps(document))
    stale = publishing.Publisher(MetricSet(CollectorRegistry()), str(mpdir), 3600)
    with caplog.at_level(logging.WARNING, logger="sigtrace"):
        stale.ensure_started()  # a process's first request
    stale.publish_and_stop()
    (message,) = [r.getMessage() for r in caplog.records if "earlier server run" in r.getMessage()]
    assert name in message and "Empty the directory" in message
    caplog.clear()
    (mpdir / name).unlink()
    fresh = publishing.Publisher(MetricSet(CollectorRegistry()), str(mpdir), 3600)
    with caplog.at_level(logging.WARNING, logger="sigtrace"):
        fresh.ensure_started()
    fresh.publish_and_stop()
    assert not [r for r in caplog.records if "earlier server run" in r.getMessage()]


def test_clear_removes_only_sigtraces_files_of_an_earlier_run(mpdir: Path) -> None:
    _good(mpdir)  # under this process's pid: clear() runs in a new master
    (mpdir / mpd.LOCK_NAME).touch()
    (mpdir / "counter_123.db").write_bytes(b"")  # prometheus-client's
    removed = mpd.clear(str(mpdir))
    assert len(removed) == 2 and files(mpdir) == {"counter_123.db"}


def test_clear_keeps_a_live_process_of_this_run_and_the_archive(mpdir: Path) -> None:
    """A gunicorn USR2 upgrade: the new master starts beside the old workers."""
    old_worker = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )  # same process group: same run
    try:
        live = MetricSet(CollectorRegistry(), buckets=(0.1,))
        record(live, 3)
        kept = write_as(mpdir, old_worker.pid, live)
        dead = MetricSet(CollectorRegistry(), buckets=(0.1,))
        record(dead, 4)
        write_as(mpdir, dead_pid(), dead)
        assert mpd.archive_dead(str(mpdir)) == 1
        assert mpd.clear(str(mpdir)) == []
        assert files(mpdir) == {kept, mpd.ARCHIVE_NAME, mpd.LOCK_NAME}
        assert scrape(mpdir)[SENDS] == 7
    finally:
        assert old_worker.stdin is not None
        old_worker.stdin.close()
        old_worker.wait(30)


def test_the_cli_reads_a_directory_full_of_bad_entries(mpdir: Path) -> None:
    from tests.servers import REPO, clean_env

    good = MetricSet(CollectorRegistry())
    for _ in range(5):
        good.signal_sends.child("gunicorn-signup").inc()  # a signal the CLI's app knows
    write_as(mpdir, os.getpid(), good)
    _entry(mpdir).write_text('{"format": 2, "families": 7}')
    (mpdir / mpd.ARCHIVE_NAME).write_text("{corrupt")
    _entry(mpdir).mkdir()
    done = subprocess.run(
        [
            *(sys.executable, "-m", "flask", "--app", "tests.apps.gunicorn_app:app"),
            *("sigtrace", "signals", "--json"),
        ],
        cwd=REPO,
        env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(mpdir)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    signals = {s["name"]: s for s in json.loads(done.stdout)["signals"]}
    assert signals["gunicorn-signup"]["sends"] == 5
    assert "invalid_document" in done.stderr and "Traceback" not in done.stderr


def test_gunicorn_hooks_let_no_exception_of_sigtrace_through(
    mpdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever sigtrace raises inside child_exit or worker_exit, the master
    and the exiting worker go on (gunicorn would halt on it)."""
    from types import SimpleNamespace

    from sigtrace import gunicorn

    def broken(*args: object) -> None:
        raise RuntimeError("a bug in sigtrace")

    monkeypatch.setattr(mpd, "archive_dead", broken)
    monkeypatch.setattr(publishing, "stop_all", broken)
    server = SimpleNamespace(log=logging.getLogger("gunicorn.error"))
    worker = SimpleNamespace(pid=dead_pid())
    with caplog.at_level(logging.WARNING):
        gunicorn.child_exit(server, worker)
        gunicorn.worker_exit(server, worker)
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot archive worker" in m and "a bug in sigtrace" in m for m in messages)
    assert any("cannot publish worker" in m for m in messages)


# --------------------------------------------------------------------------
# The failure counts: every process's, summed like its values


def test_failure_counts_are_written_once_met_and_only_when_they_change(
    mpdir: Path, metrics: MetricSet
) -> None:
    publisher = _published(metrics, 3)
    assert scrape(mpdir)[SENDS] == 3
    errors_name = mpd._errors.name
    assert files(mpdir) == {publisher.name}  # no failure met: no errors file

    _entry(mpdir).write_text("{not json")  # this process is alive: read at every scrape
    assert errors(scrape(mpdir), "invalid_json") == 1
    document = fmt.parse((mpdir / errors_name).read_bytes(), "process")
    assert document["pid"] == os.getpid()
    assert [(f["name"], f["series"]) for f in document["families"]] == [
        (mpd.ERRORS_NAME, [{"labels": ["invalid_json"], "value": 1.0}])
    ]
    written = (mpdir / errors_name).stat().st_ino
    record(metrics, 1)
    assert publisher.publish()
    assert (mpdir / errors_name).stat().st_ino == written  # unchanged counts: not rewritten
    assert errors(scrape(mpdir), "invalid_json") == 2  # its own file skipped: not 1 + 2
    assert fmt.parse((mpdir / errors_name).read_bytes(), "process")["families"][0]["series"] == [
        {"labels": ["invalid_json"], "value": 2.0}
    ]


def test_a_dead_processs_failures_are_summed_then_archived(mpdir: Path) -> None:
    pid = dead_pid()
    family = fmt.Family(
        name=mpd.ERRORS_NAME,
        help="failures",
        kind="counter",
        labels=["reason"],
        bounds=[],
        series=[fmt.CounterSeries(labels=["disk_full"], value=4.0)],
    )
    name = f"sigtrace-{pid}-0123abcd.json"
    mpd.write_private(str(mpdir), name, fmt.encode(fmt.document("process", pid, [family])))
    assert errors(scrape(mpdir, archive=False), "disk_full") == 4
    mpd.report("disk_full", str(mpdir), "this process's own")
    samples = scrape(mpdir)  # archives the dead process's file
    assert errors(samples, "disk_full") == 5
    assert name not in files(mpdir) and mpd.ARCHIVE_NAME in files(mpdir)
    assert errors(scrape(mpdir), "disk_full") == 5
