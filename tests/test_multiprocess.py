"""sigtrace.multiprocess_*: publish, merge, archive, exemplars, totals that never go back.

Unit level: real files in a temporary directory, real forks and real dead
processes, the exposition read back through prometheus-client's parser.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from sigtrace import ConfigError
from sigtrace import multiprocess_directory as mpd
from sigtrace import multiprocess_format as fmt
from sigtrace import multiprocess_publisher as publishing
from sigtrace.metrics import MetricSet
from tests.conftest import samples_from_text

SIGNAL = "mp-signal"


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


@pytest.fixture
def mpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "multiproc"
    path.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    return path


@pytest.fixture
def metrics() -> MetricSet:
    return MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))


def record(
    metrics: MetricSet, sends: int, durations: t.Sequence[float] = (), trace: str = ""
) -> None:
    child = metrics.signal_sends.child(SIGNAL)
    for _ in range(sends):
        child.inc()
    histogram = metrics.receiver_duration.child(SIGNAL, "mod.recv")
    for duration in durations:
        histogram.observe(duration, {"trace_id": trace} if trace else None)


def scrape(path: Path, *, archive: bool = True, openmetrics: bool = False) -> str:
    registry = CollectorRegistry()
    registry.register(
        mpd.PublishedTotalsCollector(
            str(path), archive=archive, before_read=publishing.publish_all if archive else None
        )
    )
    body = (generate_openmetrics if openmetrics else generate_latest)(registry)
    return body.decode()


def totals(
    path: Path, archive: bool = True
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples_from_text(scrape(path, archive=archive))


SENDS = ("sigtrace_signal_sends_total", (("signal", SIGNAL),))
CALLS = ("sigtrace_receiver_duration_seconds_count", (("receiver", "mod.recv"), ("signal", SIGNAL)))
SUM = ("sigtrace_receiver_duration_seconds_sum", (("receiver", "mod.recv"), ("signal", SIGNAL)))


def files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def write_as(path: Path, pid: int, metrics: MetricSet) -> str:
    """Publish ``metrics`` as if by process ``pid`` (a dead one): a file named for it."""
    document = fmt.process_document(metrics, pid)
    name = f"sigtrace-{pid}-{os.urandom(4).hex()}.json"
    temp = path / f".{name}.{os.getpid()}.tmp"
    temp.write_bytes(fmt.encode(document))
    os.replace(temp, path / name)  # whole, as the publisher writes
    return name


def test_attach_writes_nothing_and_publish_only_on_change(mpdir: Path, metrics: MetricSet) -> None:
    publisher = publishing.attach(metrics, interval=3600)
    assert publisher is not None
    assert files(mpdir) == set()
    assert publisher.publish() is False  # nothing recorded: no file
    assert files(mpdir) == set()
    record(metrics, 3)
    assert publisher.publish() is True
    (name,) = files(mpdir)
    assert name.startswith(f"sigtrace-{os.getpid()}-") and name.endswith(".json")
    mtime = (mpdir / name).stat().st_mtime_ns
    assert publisher.publish() is False  # unchanged: not rewritten
    assert (mpdir / name).stat().st_mtime_ns == mtime
    assert totals(mpdir)[SENDS] == 3
    record(metrics, 2)
    assert publisher.publish() is True
    assert files(mpdir) == {name}
    assert totals(mpdir)[SENDS] == 5


def test_attach_outside_multiprocess_mode_is_none(
    monkeypatch: pytest.MonkeyPatch, metrics: MetricSet
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert publishing.attach(metrics) is None


def test_missing_directory_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metrics: MetricSet
) -> None:
    missing = tmp_path / "nope"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(missing))
    with pytest.raises(ConfigError) as info:
        publishing.check_at_init(str(missing))
    message = str(info.value)
    assert "PROMETHEUS_MULTIPROC_DIR" in message and str(missing) in message
    assert "mkdir -m 0700 -p" in message
    assert not missing.exists()


def test_init_app_refuses_a_missing_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry
) -> None:
    from flask import Flask

    from sigtrace import SigTrace, dispatch

    missing = tmp_path / "gone"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(missing))
    app = Flask(__name__)
    with pytest.raises(ConfigError, match=r"PROMETHEUS_MULTIPROC_DIR=.*gone.*not an existing"):
        SigTrace(app, registry=registry)
    assert "sigtrace" not in app.extensions
    assert not dispatch.is_instrumented()


def test_unwritable_directory_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, metrics: MetricSet
) -> None:
    # /proc/sys refuses new files even to root (where chmod would not).
    assert not os.access("/proc/sys", os.W_OK)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/proc/sys")
    with pytest.raises(ConfigError, match=r"PROMETHEUS_MULTIPROC_DIR='/proc/sys' is not writable"):
        publishing.check_at_init("/proc/sys")


def test_workers_are_summed_and_the_freshest_exemplar_wins(mpdir: Path) -> None:
    a = MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))
    b = MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))
    record(a, 4, [0.05, 0.5], trace="aaaa")
    time.sleep(0.01)  # distinct exemplar timestamps
    record(b, 6, [0.07, 5.0], trace="bbbb")
    write_as(mpdir, os.getpid(), a)  # both "alive": this process's pid
    write_as(mpdir, os.getpid(), b)
    # A histogram that has a series but no observations is not exposed.
    empty = MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))
    record(empty, 1)
    write_as(mpdir, os.getpid(), empty)

    samples = totals(mpdir)
    assert samples[SENDS] == 11
    assert samples[CALLS] == 4
    assert samples[SUM] == pytest.approx(0.05 + 0.5 + 0.07 + 5.0)
    bucket = "sigtrace_receiver_duration_seconds_bucket"
    labels = (("receiver", "mod.recv"), ("signal", SIGNAL))
    assert [samples[(bucket, (("le", le), *labels))] for le in ("0.1", "1.0", "+Inf")] == [2, 3, 4]

    families = {f.name: f for f in text_string_to_metric_families(scrape(mpdir, openmetrics=True))}
    exemplars = {
        s.labels["le"]: s.exemplar.labels["trace_id"]
        for s in families["sigtrace_receiver_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.exemplar is not None
    }
    # 0.1: both had one, b's is fresher; 1.0: only a's; +Inf: only b's.
    assert exemplars == {"0.1": "bbbb", "1.0": "aaaa", "+Inf": "bbbb"}
    assert "sigtrace_signal_duration_seconds" not in families  # never observed


def test_dead_processes_are_archived_into_one_file(mpdir: Path) -> None:
    live = MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))
    record(live, 1, [0.05], trace="live")
    live_name = write_as(mpdir, os.getpid(), live)
    for i in range(3):
        dead = MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))
        record(dead, 10, [0.5] * (i + 1), trace=f"dead{i}")
        write_as(mpdir, dead_pid(), dead)
    before = totals(mpdir, archive=False)
    assert before[SENDS] == 31
    assert mpd.archive_dead(str(mpdir)) == 3
    assert files(mpdir) == {live_name, mpd.ARCHIVE_NAME, mpd.LOCK_NAME}
    assert totals(mpdir, archive=False) == before
    assert mpd.archive_dead(str(mpdir)) == 0  # nothing left to archive
    # Archiving again later adds to the archive, and exemplars survive it.
    dead = MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))
    record(dead, 5)
    write_as(mpdir, dead_pid(), dead)
    assert totals(mpdir)[SENDS] == 36  # a scrape archives too
    assert files(mpdir) == {live_name, mpd.ARCHIVE_NAME, mpd.LOCK_NAME}
    text = scrape(mpdir, openmetrics=True)
    assert 'trace_id="dead2"' in text and 'trace_id="live"' in text


def test_an_archiving_pass_cut_short_counts_nothing_twice(mpdir: Path) -> None:
    dead = MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))
    record(dead, 7)
    name = write_as(mpdir, dead_pid(), dead)
    assert mpd.archive_dead(str(mpdir)) == 1
    # As if the archiver died after writing the archive, before deleting the file:
    (mpdir / name).write_bytes(fmt.encode(fmt.process_document(dead, dead_pid())))
    assert totals(mpdir, archive=False)[SENDS] == 7  # listed in the archive: skipped
    assert mpd.archive_dead(str(mpdir)) == 0
    assert name not in files(mpdir)  # and deleted by the next archiving pass
    assert totals(mpdir)[SENDS] == 7
    archive = json.loads((mpdir / mpd.ARCHIVE_NAME).read_text())
    assert archive["archived"] == [name]  # pruned at the next pass that changes it


def test_a_thousand_restarts_keep_the_directory_small_and_totals_exact(mpdir: Path) -> None:
    one = MetricSet(CollectorRegistry(), buckets=(0.1, 1.0))
    record(one, 1, [0.05], trace="x")
    document = fmt.encode(fmt.process_document(one, os.getpid()))
    pid = dead_pid()
    for i in range(1000):
        (mpdir / f"sigtrace-{pid}-{i:08x}.json").write_bytes(document)
        if i % 50 == 49:  # child_exit archives after each exit; here every 50
            mpd.archive_dead(str(mpdir))
    samples = totals(mpdir)
    assert samples[SENDS] == 1000 and samples[CALLS] == 1000
    assert files(mpdir) == {mpd.ARCHIVE_NAME, mpd.LOCK_NAME}
    assert (mpdir / mpd.ARCHIVE_NAME).stat().st_size < 4096


def test_totals_never_go_back_while_processes_publish_and_die(mpdir: Path) -> None:
    """Readers race an archiver and publishers: each value counted exactly once."""
    pids = [dead_pid() for _ in range(4)]
    stop = threading.Event()
    seen: list[list[float]] = [[], [], []]
    errors: list[BaseException] = []

    def reader(index: int) -> None:
        try:
            while not stop.is_set():
                # Two readers only read; one archives too, as a scrape does.
                seen[index].append(totals(mpdir, archive=index == 2).get(SENDS, 0.0))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    expected = 0
    live = MetricSet(CollectorRegistry(), buckets=(0.1,))
    publisher = publishing.Publisher(live, str(mpdir), 3600)
    try:
        for i in range(200):
            dead = MetricSet(CollectorRegistry(), buckets=(0.1,))
            record(dead, i % 5 + 1)
            expected += i % 5 + 1
            write_as(mpdir, pids[i % 4], dead)
            record(live, 1)
            expected += 1
            publisher.publish()  # a live process growing its file
            if i % 7 == 0:
                mpd.archive_dead(str(mpdir))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    for readings in seen:
        assert len(readings) >= 5
        drops = [(a, b) for a, b in itertools.pairwise(readings) if b < a]
        assert not drops, drops
        assert readings[-1] <= expected
    assert totals(mpdir)[SENDS] == expected


def test_a_reader_writes_nothing(mpdir: Path) -> None:
    dead = MetricSet(CollectorRegistry(), buckets=(0.1,))
    record(dead, 2)
    name = write_as(mpdir, dead_pid(), dead)
    assert totals(mpdir, archive=False)[SENDS] == 2
    assert files(mpdir) == {name}  # no lock file, no archive


def test_a_forked_child_publishes_only_its_own_values(mpdir: Path, metrics: MetricSet) -> None:
    publisher = publishing.attach(metrics, interval=3600)
    assert publisher is not None
    record(metrics, 5)  # recorded before the fork (e.g. a --preload master)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            publisher.ensure_started()
            record(metrics, 2)
            publisher.publish_and_stop()
            os.write(write, b"ok")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 2) == b"ok"
    os.waitpid(pid, 0)
    os.close(read)
    # The parent published its 5 once, before forking; the child only its 2.
    assert totals(mpdir)[SENDS] == 7
    publisher.publish()
    assert totals(mpdir)[SENDS] == 7
