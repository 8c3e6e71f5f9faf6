"""Faults injected into a real 2-worker gunicorn's multiprocess directory.

Each test keeps HTTP load running while it breaks the directory (bad entries,
a corrupt archive, the directory removed or turned into a file, a stalled
lock holder, a full or read-only disk) and asserts what users meet: every
request answered, the master alive, workers respawned, every scrape a 200
with the good data, totals exact once the fault is gone (graceful paths), the
errors metric, and no sigtrace file readable by another user. Also: a root
master with ``user = nobody`` workers, a new run starting from zero, and a
directory other users can write refused at start.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sigtrace import multiprocess_directory as mpd
from sigtrace import multiprocess_format as fmt
from sigtrace.metrics import MetricSet
from tests.servers import (
    BOOT_SENDS,
    GUNICORN_CONF,
    SENDS,
    TOTALS,
    Key,
    Server,
    clean_env,
    run_until,
    start_gunicorn,
)
from tests.test_multiprocess import dead_pid
from tests.test_multiprocess_faults import fill

pytest.importorskip("gunicorn", reason="gunicorn is a dev dependency: pip install -e '.[dev]'")
if sys.platform == "win32":  # pragma: no cover
    pytest.skip("gunicorn does not run on Windows", allow_module_level=True)

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount, chown, user =")
NOBODY = 65534
INTERVAL = "0.2"


def error_count(samples: dict[Key, float], reason: str) -> float:
    return samples.get(("sigtrace_multiprocess_errors_total", (("reason", reason),)), 0.0)


class Load:
    """Requests from 4 client threads until stopped; every one must be answered."""

    def __init__(self, server: Server, answered_before: int = 0) -> None:
        self.server = server
        self.answered = answered_before  # the server's total, from earlier loads
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(4)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self.server.signup(f"load{index}-{n}")
            except BaseException as error:
                self.failures.append(error)
                return
            n += 1
            with self._lock:
                self.answered += 1

    def wait_for(self, count: int) -> None:
        run_until(lambda: self.answered >= count or bool(self.failures), f"{count} answers")

    def stop(self) -> int:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not self.failures, self.failures[:3]
        return self.answered


def scrape_ok(server: Server) -> dict[Key, float]:
    """A scrape that must be a 200 holding sigtrace's series."""
    samples = server.scrape()  # urllib raises on anything but a 2xx
    assert samples.get(SENDS, 0) > 0, "no sigtrace series in the scrape"
    return samples


def assert_private(directory: Path) -> None:
    assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0 or directory.is_mount()
    for entry in directory.iterdir():
        if entry.name.startswith(("sigtrace", ".sigtrace")) and ".corrupt-" not in entry.name:
            assert stat.S_IMODE(entry.lstat().st_mode) == 0o600, entry


def remove_under_load(directory: Path) -> None:
    """``rm -r`` as one step: renamed away first, so the workers writing into it
    meanwhile cannot make the removal fail ("Directory not empty")."""
    gone = directory.with_name(f"{directory.name}.removed-{os.urandom(4).hex()}")
    directory.rename(gone)
    shutil.rmtree(gone)


def replace_with_a_file(directory: Path) -> None:
    """The directory replaced by a file, under load: a worker may recreate the
    removed directory first, so the file is renamed into place (which fails on
    a directory) until it is there."""
    file = directory.with_name(f"{directory.name}.file")
    for _ in range(100):
        remove_under_load(directory)
        file.write_text("not a directory")
        try:
            os.rename(file, directory)
            return
        except IsADirectoryError:
            continue  # recreated meanwhile
    raise AssertionError(f"{directory} kept being recreated")


def worker_pids(server: Server) -> set[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(server.proc.pid)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {int(p) for p in out.split()}


def stop_one_worker(server: Server) -> int:
    """SIGTERM one worker (a graceful exit) and wait for its replacement."""
    before = worker_pids(server)
    victim = min(before)
    os.kill(victim, signal.SIGTERM)
    run_until(
        lambda: victim not in worker_pids(server) and len(worker_pids(server)) == 2,
        "a new worker",
    )
    assert server.proc.poll() is None  # the master lives
    return victim


def plant_bad_entries(directory: Path, pid: int) -> None:
    """Every kind of bad entry, named like a snapshot of process ``pid``."""
    (directory / f"sigtrace-{pid}-a1.json").write_text('{"format": 2, "families": 7}')
    (directory / f"sigtrace-{pid}-a2.json").write_text('{"format": 2, "fam')
    (directory / f"sigtrace-{pid}-a3.json").write_bytes(b"\xff\x00garbage")
    one = MetricSet(CollectorRegistry())
    one.signal_sends.child("gunicorn-signup").inc()
    text = fmt.encode(fmt.process_document(one, pid)).decode()
    (directory / f"sigtrace-{pid}-a4.json").write_text(text.replace('"value":1.0', '"value":-5'))
    (directory / f"sigtrace-{pid}-a5.json").write_text(text.replace('"value":1.0', '"value":NaN'))
    (directory / f"sigtrace-{pid}-a6.json").mkdir()
    os.mkfifo(directory / f"sigtrace-{pid}-a7.json")
    (directory / f"sigtrace-{pid}-a8.json").symlink_to(directory / "nowhere")


def test_fault_matrix_under_load(tmp_path: Path, servers: list[Server]) -> None:
    # Without the app's own prometheus-client gauge: prometheus-client raises
    # at import in a worker whose directory is broken (phase 4).
    gunicorn = start_gunicorn(tmp_path, SIGTRACE_PUBLISH_INTERVAL=INTERVAL, TEST_CLIENT_GAUGE="0")
    servers.append(gunicorn)
    directory = gunicorn.prometheus_dir
    load = Load(gunicorn)
    try:
        # 1. A corrupt archive and every kind of bad entry, live and dead.
        (directory / mpd.ARCHIVE_NAME).write_text('{"format": 2, "kind": "arch')
        plant_bad_entries(directory, gunicorn.proc.pid)  # "alive": read at every scrape
        plant_bad_entries(directory, dead_pid())  # dead: set aside when archived
        load.wait_for(load.answered + 100)
        samples = scrape_ok(gunicorn)
        for reason in ("invalid_document", "invalid_json", "not_regular", "archive_invalid_json"):
            assert error_count(samples, reason) >= 1, reason

        # 2. The directory removed under load: recreated 0700, published whole.
        remove_under_load(directory)
        load.wait_for(load.answered + 100)
        run_until(directory.exists, "the directory recreated")
        scrape_ok(gunicorn)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        answered = load.stop()
        gunicorn.wait_for_totals(answered)  # exact: nothing lost, nothing twice
        assert_private(directory)

        # 3. A stalled lock holder: child_exit and scrapes give up after the
        # bound, the worker is respawned, nothing is lost.
        load = Load(gunicorn, answered)
        with hold_lock(directory):
            stop_one_worker(gunicorn)
            load.wait_for(load.answered + 50)
            samples = scrape_ok(gunicorn)
            answered = load.stop()
            gunicorn.wait_for_totals(answered)
        # The master's child_exit gave up on the lock (it warns; it respawned).
        assert any("multiprocess lock_timeout" in line for line in gunicorn.log)
        # and wrote its count to a file of its own, which every scrape reads
        master = f"sigtrace-{gunicorn.proc.pid}-"
        run_until(lambda: any(f.startswith(master) for f in gunicorn.files()), "the master's")
        assert error_count(scrape_ok(gunicorn), "lock_timeout") >= 1
        gunicorn.wait_for_totals(answered)
        run_until(lambda: mpd.ARCHIVE_NAME in gunicorn.files(), "the dead worker archived")
        assert_private(directory)

        # 4. The directory replaced by a file: a worker still boots, requests
        # are answered, scrapes serve the worker's own values from memory.
        load = Load(gunicorn, answered)
        replace_with_a_file(directory)
        stop_one_worker(gunicorn)
        load.wait_for(load.answered + 50)
        samples = scrape_ok(gunicorn)
        assert error_count(samples, "read_failed") >= 1
        directory.unlink()  # back: every live worker publishes again
        directory.mkdir(mode=0o700)
        load.wait_for(load.answered + 50)
        load.stop()
        run_until(lambda: scrape_ok(gunicorn)[SENDS] > 0, "values published again")
        assert_private(directory)
    finally:
        load._stop.set()
    assert gunicorn.proc.poll() is None
    gunicorn.stop()
    assert gunicorn.proc.returncode == 0, "\n".join(gunicorn.log[-40:])


class hold_lock:
    """Another process holding ``sigtrace.lock`` until the block ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __enter__(self) -> None:
        lock = self.directory / mpd.LOCK_NAME
        if not lock.exists():
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, sys; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX);"
                " print('held', flush=True); sys.stdin.read()",
                str(lock),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "held\n"

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


@as_root
def test_disk_full_and_read_only_under_load(
    tmp_path: Path, small_tmpfs: Path, servers: list[Server]
) -> None:
    # Without the app's prometheus-client gauge, whose open mmap file would
    # keep the tmpfs from being remounted read-only.
    gunicorn = start_gunicorn(
        tmp_path,
        prometheus_dir=small_tmpfs,
        SIGTRACE_PUBLISH_INTERVAL=INTERVAL,
        TEST_CLIENT_GAUGE="0",
    )
    servers.append(gunicorn)
    load = Load(gunicorn)
    load.wait_for(50)
    filler = fill(small_tmpfs)
    start = load.answered
    load.wait_for(start + 100)
    samples = scrape_ok(gunicorn)
    assert error_count(samples, "disk_full") >= 1
    filler.unlink()  # space again: the values kept in memory are published
    answered = load.stop()
    gunicorn.wait_for_totals(answered)

    load = Load(gunicorn, answered)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    try:
        load.wait_for(load.answered + 100)
        samples = scrape_ok(gunicorn)
        assert error_count(samples, "write_denied") >= 1
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    answered = load.stop()
    gunicorn.wait_for_totals(answered)
    assert_private(small_tmpfs)
    assert gunicorn.proc.poll() is None


# --------------------------------------------------------------------------
# A new run; refusals at start; a root master with workers of another user


def test_the_errors_total_is_every_workers_and_survives_a_sigkill(
    tmp_path: Path, servers: list[Server]
) -> None:
    """A bad file of a live process is met by every scrape, in whichever worker
    serves it: the n-th scrape serves exactly n such failures (summed over the
    workers' errors files, never one worker's own count), and a SIGKILLed
    worker's failures stay in the total (archived with its values)."""
    gunicorn = start_gunicorn(tmp_path, SIGTRACE_PUBLISH_INTERVAL=INTERVAL)
    servers.append(gunicorn)
    gunicorn.load_every_worker(20)
    bad = gunicorn.prometheus_dir / f"sigtrace-{os.getpid()}-0badf11e.json"
    bad.write_text("{not json")  # this test's process: alive, so read by every scrape
    scrapes = 0
    counts: list[float] = []
    lock = threading.Lock()

    def scraper() -> None:  # two at a time: each sync worker serves some
        nonlocal scrapes
        for _ in range(15):
            samples = scrape_ok(gunicorn)
            with lock:
                scrapes += 1
                counts.append(error_count(samples, "invalid_json"))

    threads = [threading.Thread(target=scraper) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert scrapes == 30 and all(1 <= c <= 30 for c in counts), counts

    def errors_files() -> dict[int, float]:
        """Each worker's count, read from its errors file."""
        found: dict[int, float] = {}
        for path in gunicorn.prometheus_dir.glob("sigtrace-*-*.json"):
            if path == bad:
                continue
            document = fmt.parse(path.read_bytes(), "process")
            for family in document["families"]:
                if family["name"] == mpd.ERRORS_NAME:
                    assert document["pid"] is not None
                    found[document["pid"]] = sum(s["value"] for s in family["series"])
        return found

    per_worker = errors_files()
    assert len(per_worker) == 2 and all(per_worker.values()), per_worker  # both served some
    assert sum(per_worker.values()) == 30
    assert error_count(scrape_ok(gunicorn), "invalid_json") == 31  # not this worker's alone

    victim = max(per_worker, key=per_worker.__getitem__)
    os.kill(victim, signal.SIGKILL)
    gunicorn.wait_for_log(rf"Worker \(pid:{victim}\) was sent SIGKILL")
    run_until(lambda: victim not in errors_files(), "the victim's errors archived")
    assert error_count(scrape_ok(gunicorn), "invalid_json") == 32


def test_a_new_run_starts_from_zero(tmp_path: Path, servers: list[Server]) -> None:
    first = start_gunicorn(tmp_path)
    servers.append(first)
    first.load(20)
    first.wait_for_totals(20)
    first.stop()
    assert first.directory_totals() == [20] * len(TOTALS)
    second = start_gunicorn(tmp_path, prometheus_dir=first.prometheus_dir)
    servers.append(second)
    second.wait_for_log(r"removed \d+ file\(s\) of an earlier run")
    second.load(5)
    second.wait_for_totals(5)  # not 25


def refused_start(tmp_path: Path, directory: Path, conf: str = "") -> str:
    """gunicorn's output when it refuses to start on ``directory``."""
    conf_path = tmp_path / "gunicorn.conf.py"
    conf_path.write_text(GUNICORN_CONF + "workers = 1\n" + conf)
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(conf_path), "tests.apps.gunicorn_app:app"],
        env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(directory)),
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "Booting worker" not in done.stderr
    return done.stderr


def test_a_directory_others_can_write_is_refused_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    directory.chmod(0o1777)  # docker-compose's former tmpfs mode
    stderr = refused_start(tmp_path, directory)
    assert "writable by other users" in stderr and "mode 1777" in stderr
    assert "chmod 0700" in stderr


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory owned by nobody, 0700, reachable by nobody (not under tmp_path,
    which is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="sigtrace-nobody-"))
    base.chmod(0o711)
    directory = base / "prometheus"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    yield directory
    shutil.rmtree(base)


@as_root
def test_a_root_master_with_nobody_workers_under_umask_027(
    tmp_path: Path, nobody_dir: Path, servers: list[Server]
) -> None:
    # --preload: the root master imports the app (its boot send is published
    # by root before the first fork); the workers drop to nobody.
    gunicorn = start_gunicorn(
        tmp_path,
        prometheus_dir=nobody_dir,
        umask=0o027,
        args=["--preload", "--user", "nobody", "--group", "nogroup", "--umask", "027"],
        # This machine's interpreter may live where nobody cannot read it
        # (/root): the master imports what workers would import lazily.
        conf="import encodings.idna\nmax_requests = 20\nmax_requests_jitter = 0\n",
        SIGTRACE_PUBLISH_INTERVAL=INTERVAL,
    )
    servers.append(gunicorn)
    asked = 4
    served_by = {gunicorn.get("/signup/who")["pid"] for _ in range(asked)}
    assert {os.stat(f"/proc/{pid}").st_uid for pid in served_by} == {NOBODY}
    pids = gunicorn.load(120, threads=4)
    n = asked + 120
    assert len(set(pids)) >= 4  # recycled: the root master archived dead workers
    gunicorn.wait_for_totals(n)
    samples = gunicorn.scrape()
    assert samples[BOOT_SENDS] == 1
    assert mpd.ARCHIVE_NAME in gunicorn.files()
    for entry in nobody_dir.iterdir():
        if entry.name.startswith("sigtrace"):
            info = entry.stat()
            assert info.st_uid == NOBODY and stat.S_IMODE(info.st_mode) == 0o600, entry
    gunicorn.stop()
    assert gunicorn.directory_totals() == [n] * len(TOTALS)


@as_root
def test_workers_of_another_user_than_the_directory_s_are_refused_at_start(
    tmp_path: Path, nobody_dir: Path
) -> None:
    os.chown(nobody_dir, 0, 0)  # root's: the nobody workers could not write
    stderr = refused_start(tmp_path, nobody_dir, "user = 'nobody'\n")
    assert f"workers run as uid {NOBODY}" in stderr and "chown" in stderr
