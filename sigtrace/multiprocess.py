"""Metrics across worker processes (gunicorn, uWSGI): publish, merge, fold.

Every process records into its own memory (:class:`sigtrace.metrics.MetricSet`),
in one process and in every worker alike: no lock and no file write per
observation. With ``PROMETHEUS_MULTIPROC_DIR`` set, this module makes any
worker's scrape show the sum over all workers, live and dead.

**Publishing.** Each process that serves requests publishes a snapshot of its
values (counters, per-bucket counts, sums, and per bucket the freshest
exemplar with its timestamp) to its own file in the directory,
``sigtrace-<pid>-<nonce>.json``. The random nonce makes the name unique even
when the kernel reuses a dead worker's pid, so a new process never overwrites
a dead one's values. A daemon thread publishes every ``interval`` seconds
(``SIGTRACE_PUBLISH_INTERVAL``, default 1 s), and only when a value changed; a
scrape served by a worker publishes that worker's values first; a graceful
exit publishes the last values (``atexit``, and gunicorn's ``worker_exit``
hook in :mod:`sigtrace.gunicorn`). A file is written whole to a temporary name
and renamed over the old one (``os.replace``), so a reader sees the previous
or the new snapshot, never half of one. A process killed with SIGKILL loses
what it recorded since its last publish: at most one interval.

The publisher starts at a process's first request (the extension's request
hook; one attribute check per request afterwards), never at ``init_app``: ``flask
sigtrace signals`` and other commands that build the app never write into the
directory. A process that forks (a gunicorn ``--preload`` master) publishes
what it recorded before its first fork, once, so sends made while importing
the app count exactly once; its children start from zero.

**Forks.** A forked child must not publish its parent's values as its own: an
``os.register_at_fork`` hook resets the copied values in the child and gives
it a new file. uWSGI forks its workers from C, where Python's fork hooks do
not run: there the same reset is chained onto ``uwsgi.post_fork_hook``, and
the publisher also compares the pid it belongs to with ``os.getpid()`` when it
starts (a master that forks never served a request, so its publisher never
started). As the master never published, each child first writes the values
it copied to the master's file, under the master's name. A request pays one
attribute check, not a ``getpid`` system call (about 0.5 µs on a virtual machine).

**Threads.** uWSGI runs no Python thread unless started with
``--enable-threads`` (or ``--threads``); the OpenTelemetry batch span
processor needs it too. Without threads, values are published at the end of a
request at most once per interval, and at exit.

**Folding.** A dead process's file is folded into one archive,
``sigtrace-archive.json``, so after a thousand worker restarts the directory
still holds one file per live worker plus the archive, and a scrape reads as
few files. Folding runs under an exclusive ``fcntl.flock`` on
``sigtrace.lock`` (one folder at a time) in gunicorn's ``child_exit`` hook (in
the master) and in any scrape that finds the file of a process that no longer
exists (``os.kill(pid, 0)``). The archive lists the names it has folded, and
is written (atomically) before those files are deleted, so a fold cut short
at any point counts nothing twice and loses nothing.

**Reading without a lock.** A reader loads the archive, then every process
file not named in it, then checks that the archive's generation (a number
each fold increments) has not changed. A file folded after the archive was
loaded is either still there and counted from the file (not from the older
archive), or gone, and then the generation changed: the reader starts over.
So each value is counted exactly once, scrapes never wait for a fold, and a
reader writes nothing, not even a lock file: the CLI can read a live
deployment's directory. After repeated collisions a reader takes the folders'
lock (shared) and reads once more. Every published value only grows and
folding keeps sums, so totals never go back.

**Why not prometheus-client's ``.db`` files.** Its multiprocess files hold one
float per sample, written under a lock on every observation, and carry no
exemplars (its multiprocess mode does not support them). sigtrace's snapshot
is a handful of families per process written at most once a second, so a
small JSON document is enough, carries exemplars, and is easy to inspect.
prometheus-client's own multiprocess metrics (a user's ``Gauge`` in the same
directory) are still merged into the same scrape by its ``MultiProcessCollector``.

All processes sharing the directory must share one pid namespace (one host or
one container), since liveness is judged by pid.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
import typing as t
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

if t.TYPE_CHECKING:
    from .metrics import HistogramValue, MetricSet

__all__ = [
    "ARCHIVE_NAME",
    "DEFAULT_INTERVAL",
    "ENV",
    "LOCK_NAME",
    "MultiprocessCollector",
    "Publisher",
    "attach",
    "check_directory",
    "directory",
    "flush",
    "fold",
    "read_totals",
]

log = logging.getLogger("sigtrace")

ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_INTERVAL = 1.0
"""Seconds between two publishes of one process (``SIGTRACE_PUBLISH_INTERVAL``)."""
ARCHIVE_NAME = "sigtrace-archive.json"
LOCK_NAME = "sigtrace.lock"
_FORMAT = 1
_PROCESS_FILE = re.compile(r"^sigtrace-(\d+)-([0-9a-f]+)\.json$")
_TEMP_FILE = re.compile(r"^\.sigtrace-.*\.(\d+)\.tmp$")  # .<name>.<writer pid>.tmp
_READ_ATTEMPTS = 5


def directory() -> str | None:
    """The multiprocess directory, or None outside multiprocess mode."""
    return os.environ.get(ENV) or None


def check_directory(path: str) -> None:
    """Raise :class:`sigtrace.ConfigError` unless ``path`` is a writable directory."""
    from .config import ConfigError

    if not os.path.isdir(path):
        raise ConfigError(
            f"{ENV}={path!r} is not an existing directory: create it (empty) before "
            f"starting the server, e.g. `mkdir -p {path}`, or unset {ENV} in a single process"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{ENV}={path!r} is not writable by this process (uid {os.getuid()}): every "
            "worker writes its metrics there; make it writable for the server's user"
        )


# --------------------------------------------------------------------------
# Documents: one process's snapshot, or the archive, as JSON-ready dicts

Labels = tuple[str, ...]
# (per-bucket counts by "le", sum, per-bucket [labels, value, timestamp] by "le")
_Hist = tuple[dict[str, float], float, dict[str, list[t.Any]]]


class _FamilyTotals:
    __slots__ = ("documentation", "kind", "labelnames", "series")

    def __init__(self, documentation: str, kind: str, labelnames: list[str]) -> None:
        self.documentation = documentation
        self.kind = kind
        self.labelnames = labelnames
        self.series: dict[Labels, t.Any] = {}  # float (counter) or _Hist


Totals = dict[str, _FamilyTotals]


def snapshot_document(metrics: MetricSet, pid: int) -> dict[str, t.Any]:
    """The values of process ``pid`` as a JSON-ready document (families with data only)."""
    families = []
    for family in metrics.families:
        series: list[list[t.Any]] = []
        for values, value in family.snapshot():
            if family.kind == "counter":
                series.append([list(values), float(t.cast(float, value))])
                continue
            value = t.cast("HistogramValue", value)
            exemplars = [
                None if ex is None else [dict(ex.labels), ex.value, ex.timestamp]
                for ex in value.exemplars
            ]
            counts = [float(c) for c in value.counts]
            series.append([list(values), counts, float(value.sum), exemplars])
        if series:
            families.append(
                {
                    "name": family.name,
                    "help": family.documentation,
                    "kind": family.kind,
                    "labels": list(family.labelnames),
                    "bounds": [floatToGoString(b) for b in family.bounds],  # type: ignore[no-untyped-call]
                    "series": series,
                }
            )
    return {"format": _FORMAT, "pid": pid, "families": families}


def _add(totals: Totals, document: dict[str, t.Any]) -> None:
    """Add a document's values to ``totals``: sums, and the freshest exemplar."""
    for family in document.get("families", ()):
        name = family["name"]
        found = totals.get(name)
        if found is None:
            found = totals[name] = _FamilyTotals(family["help"], family["kind"], family["labels"])
        bounds: list[str] = family.get("bounds", [])
        for entry in family["series"]:
            key = tuple(entry[0])
            if found.kind == "counter":
                found.series[key] = found.series.get(key, 0.0) + entry[1]
                continue
            held_series: _Hist = found.series.get(key) or ({}, 0.0, {})
            counts, total, exemplars = held_series
            for le, count, exemplar in zip(bounds, entry[1], entry[3], strict=True):
                counts[le] = counts.get(le, 0.0) + count
                if exemplar is not None:
                    held = exemplars.get(le)
                    if held is None or (exemplar[2] or 0.0) >= (held[2] or 0.0):
                        exemplars[le] = exemplar
            found.series[key] = (counts, total + entry[2], exemplars)


def _document(totals: Totals, folded: Iterable[str], generation: int) -> dict[str, t.Any]:
    """``totals`` in the document format (the archive)."""
    families = []
    for name, family in totals.items():
        series: list[list[t.Any]] = []
        bounds: list[str] = []
        if family.kind == "histogram":
            les = {le for counts, _, _ in family.series.values() for le in counts}
            bounds = sorted(les, key=float)
        for key, value in family.series.items():
            if family.kind == "counter":
                series.append([list(key), value])
            else:
                counts, total, exemplars = value
                series.append(
                    [
                        list(key),
                        [counts.get(le, 0.0) for le in bounds],
                        total,
                        [exemplars.get(le) for le in bounds],
                    ]
                )
        families.append(
            {
                "name": name,
                "help": family.documentation,
                "kind": family.kind,
                "labels": family.labelnames,
                "bounds": bounds,
                "series": series,
            }
        )
    return {
        "format": _FORMAT,
        "pid": None,
        "generation": generation,  # readers notice a fold that ran while they read
        "folded": sorted(folded),
        "families": families,
    }


def _load(path: str) -> dict[str, t.Any]:
    with open(path, encoding="utf-8") as file:
        document: dict[str, t.Any] = json.load(file)
    return document


def _write_atomic(path: str, name: str, document: dict[str, t.Any]) -> None:
    """Write ``document`` as ``path/name``: whole, under a temporary name, then renamed.

    No fsync: the file must survive its process, not the machine.
    """
    temp = os.path.join(path, f".{name}.{os.getpid()}.tmp")
    if not name.startswith("sigtrace-"):  # pragma: no cover - names are ours
        raise ValueError(name)
    with open(temp, "w", encoding="utf-8") as file:
        json.dump(document, file, separators=(",", ":"))
    os.replace(temp, os.path.join(path, name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _dead_files(names: Iterable[str]) -> list[str]:
    """Process and temporary files whose process no longer exists."""
    dead = []
    for name in names:
        match = _PROCESS_FILE.match(name) or _TEMP_FILE.match(name)
        if match is not None and not _pid_alive(int(match.group(1))):
            dead.append(name)
    return dead


@contextlib.contextmanager
def _locked(path: str, *, exclusive: bool) -> Iterator[None]:
    lock_path = os.path.join(path, LOCK_NAME)
    if exclusive:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    else:
        fd = os.open(lock_path, os.O_RDONLY)  # readers never create it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------
# Folding and reading


def fold(path: str) -> int:
    """Fold the files of processes that no longer exist into the archive.

    Returns how many process files were folded. Cheap when there is nothing
    to fold (one directory listing, one ``kill(pid, 0)`` per file).
    """
    if not _dead_files(os.listdir(path)):
        return 0
    with _locked(path, exclusive=True):
        names = set(os.listdir(path))
        archive_path = os.path.join(path, ARCHIVE_NAME)
        try:
            archive = _load(archive_path)
        except FileNotFoundError:
            archive = {"families": [], "folded": []}
        folded_before = set(archive.get("folded", ()))
        totals: Totals = {}
        _add(totals, archive)
        dead = _dead_files(sorted(names))
        newly = []
        for name in dead:
            if _PROCESS_FILE.match(name) is None or name in folded_before:
                continue
            try:
                document = _load(os.path.join(path, name))
            except FileNotFoundError:
                continue
            except ValueError:
                log.warning("sigtrace: %s in %s is not valid JSON; not folded", name, path)
                continue
            _add(totals, document)
            newly.append(name)
        # Names folded earlier whose deletion did not happen stay listed (and
        # skipped by readers) until they are gone.
        folded = (folded_before & names) | set(newly)
        if newly:
            generation = int(archive.get("generation", 0)) + 1
            _write_atomic(path, ARCHIVE_NAME, _document(totals, folded, generation))
        for name in [*folded, *(n for n in dead if _TEMP_FILE.match(n))]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, name))
        return len(newly)


def read_totals(path: str) -> Totals:
    """The sum over the archive and every process file, each value counted once."""
    for _ in range(_READ_ATTEMPTS):
        try:
            totals = _read_once(path)
        except (FileNotFoundError, _ArchiveChanged):
            continue  # a fold ran while we read: start over
        return totals
    with _locked(path, exclusive=False):  # the lock file exists: folds happened
        return _read_once(path)


class _ArchiveChanged(Exception):
    pass


def _generation(path: str) -> tuple[int, dict[str, t.Any]]:
    try:
        archive = _load(os.path.join(path, ARCHIVE_NAME))
    except FileNotFoundError:
        return 0, {}
    return int(archive.get("generation", 0)), archive


def _read_once(path: str) -> Totals:
    totals: Totals = {}
    generation, archive = _generation(path)
    _add(totals, archive)
    folded = set(archive.get("folded", ()))
    for name in sorted(os.listdir(path)):
        if _PROCESS_FILE.match(name) is None or name in folded:
            continue
        try:
            document = _load(os.path.join(path, name))
        except ValueError:
            log.warning("sigtrace: %s in %s is not valid JSON; skipped", name, path)
            continue
        _add(totals, document)
    # A fold that finished meanwhile may have deleted files before we listed
    # them, whose values the archive we read does not hold yet.
    if _generation(path)[0] != generation:
        raise _ArchiveChanged
    return totals


def metric_families(totals: Totals) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
    """Prometheus families of ``totals``; histograms without observations are left out."""
    for name, family in totals.items():
        if family.kind == "counter":
            counter = CounterMetricFamily(name, family.documentation, labels=family.labelnames)
            for key, value in family.series.items():
                counter.add_metric(list(key), value)
            yield counter
            continue
        histogram = HistogramMetricFamily(name, family.documentation, labels=family.labelnames)
        for key, (counts, total, exemplars) in family.series.items():
            if not any(counts.values()):
                continue
            buckets: list[t.Any] = []
            cumulative = 0.0
            for le in sorted(counts, key=float):
                cumulative += counts[le]
                held = exemplars.get(le)
                if held is None:
                    buckets.append((le, cumulative))
                else:
                    buckets.append((le, cumulative, Exemplar(held[0], held[1], held[2])))
            histogram.add_metric(list(key), buckets, total)
        yield histogram


class MultiprocessCollector(Collector):
    """All processes' sigtrace metrics in ``path``, summed at each collect.

    A scrape (``fold=True``) first publishes this process's own latest values
    and folds dead processes' files; the CLI reads only (``fold=False``).
    """

    def __init__(self, path: str, *, fold: bool = True) -> None:
        self.path = path
        self._fold = fold

    def collect(self) -> Iterable[t.Any]:
        if self._fold:
            flush(stop=False)
            try:
                fold(self.path)
            except OSError as error:
                log.warning(
                    "sigtrace: cannot fold dead workers' metrics in %s: %s", self.path, error
                )
        try:
            totals = read_totals(self.path)
        except OSError as error:
            log.warning("sigtrace: cannot read workers' metrics in %s: %s", self.path, error)
            return
        yield from metric_families(totals)


# --------------------------------------------------------------------------
# Publishing


def _threads_run() -> bool:
    """False under uWSGI without ``--enable-threads`` / ``--threads``."""
    uwsgi = sys.modules.get("uwsgi")  # present only inside a uWSGI process
    if uwsgi is None:
        return True
    opt = getattr(uwsgi, "opt", {})
    return bool(opt.get("enable-threads") or opt.get("threads"))


class Publisher:
    """Publishes one :class:`MetricSet` of this process to its file in ``path``."""

    def __init__(self, metrics: MetricSet, path: str, interval: float) -> None:
        self.metrics = metrics
        self.path = path
        self.interval = interval
        self._pid = os.getpid()  # the process whose values ``metrics`` holds
        self._new_process_state()

    def _new_process_state(self) -> None:
        self.name = f"sigtrace-{self._pid}-{secrets.token_hex(6)}.json"  # this process's file
        self.published = False
        self._last: dict[str, t.Any] = {"format": _FORMAT, "pid": self._pid, "families": []}
        self._lock = threading.Lock()
        self._started = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._due = 0.0  # threadless mode: next publish at a request's end
        self._warned = False

    # -- the request hooks: cheap when nothing is to be done

    def ensure_started(self) -> None:
        """Called at each request's start: start publishing in this process."""
        if not self._started:  # forks clear it (Python's fork hook, uWSGI's)
            self._start()

    def after_request(self) -> None:
        """Called at each request's end: publishes only when no thread runs."""
        if self._thread is None and self._started:
            now = time.monotonic()
            if now >= self._due:
                self._due = now + self.interval
                self.publish()

    # -- process life

    def _start(self) -> None:
        with _publishers_lock:
            if self._pid != os.getpid():
                self._adopt_child()  # forked from C (uWSGI): no fork hook ran
            if self._started:
                return
            self._started = True
            if _threads_run():
                self._thread = threading.Thread(
                    target=self._run, name="sigtrace-publisher", daemon=True
                )
                self._thread.start()

    def _adopt_child(self) -> None:
        """In a forked child: forget the parent's values and file.

        A parent that never published (a uWSGI master: it forks from C, where
        the hook that publishes before a fork does not run) gets its values
        published here first, under its own name. Every child it forks does so
        with the copy it got; a parent's values only grow, so the last write is
        the newest, and the file counts them once.
        """
        self.metrics.new_locks()  # a thread of the parent may have held one at the fork
        if not (self.published or self._started):
            try:
                document = snapshot_document(self.metrics, self._pid)
                if document["families"]:
                    _write_atomic(self.path, self.name, document)
            except Exception as error:
                log.warning(
                    "sigtrace: cannot publish the parent's metrics to %s: %r",
                    self.path,
                    error,
                )
        self._pid = os.getpid()
        self.metrics.reset()  # the child must not count its parent's values again
        self._new_process_state()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.publish()

    def publish(self) -> bool:
        """Write this process's file if a value changed since the last write."""
        with self._lock:
            try:
                if self._pid != os.getpid():
                    return False  # a child that has not started yet
                document = snapshot_document(self.metrics, self._pid)
                if document == self._last:
                    return False
                _write_atomic(self.path, self.name, document)
                self._last, self.published = document, True
                return True
            except Exception as error:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "sigtrace: cannot publish this process's metrics to %s: %r",
                        self.path,
                        error,
                    )
                return False

    def stop(self) -> None:
        """Stop the thread and publish the last values (graceful exit)."""
        self._stop.set()
        self.publish()


# Publishers live as long as the process (their thread does anyway); keyed by
# the id of their MetricSet, which they keep alive.
_publishers: dict[int, Publisher] = {}
_publishers_lock = threading.Lock()


def attach(metrics: MetricSet, interval: float = DEFAULT_INTERVAL) -> Publisher | None:
    """The publisher of ``metrics`` in multiprocess mode (one per set), else None.

    Checks the directory (:class:`sigtrace.ConfigError` when unusable) and
    writes nothing: publishing starts with :meth:`Publisher.ensure_started`.
    """
    path = directory()
    if path is None:
        return None
    check_directory(path)
    _hook_uwsgi_fork()
    with _publishers_lock:
        found = _publishers.get(id(metrics))
        if found is None or found.path != path:
            found = _publishers[id(metrics)] = Publisher(metrics, path, interval)
        return found


def flush(*, stop: bool = True) -> None:
    """Publish this process's latest values now (at a scrape, or at exit)."""
    for publisher in list(_publishers.values()):
        if publisher._pid == os.getpid() and (publisher._started or publisher.published):
            if stop:
                publisher.stop()
            else:
                publisher.publish()


def _before_fork() -> None:
    # A process about to fork workers (gunicorn --preload) publishes what it
    # recorded itself, once; its children start from zero.
    for publisher in list(_publishers.values()):
        if publisher._pid == os.getpid() and not publisher._started:
            publisher.publish()


def _after_fork_in_child() -> None:
    global _publishers_lock
    _publishers_lock = threading.Lock()  # another thread may have held it at the fork
    pid = os.getpid()
    for publisher in list(_publishers.values()):
        if publisher._pid == pid:
            continue  # adopted already (both Python's and uWSGI's hook ran)
        was_running = publisher._started
        publisher._adopt_child()
        if was_running:
            publisher._start()


_uwsgi_hooked = False


def _hook_uwsgi_fork() -> None:
    """Inside uWSGI: run :func:`_after_fork_in_child` in every worker it forks.

    ``uwsgi.post_fork_hook`` is the python plugin's one post-fork callable
    (what ``uwsgidecorators.postfork`` sets); an existing one is chained.
    """
    global _uwsgi_hooked
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None or _uwsgi_hooked:
        return
    _uwsgi_hooked = True
    previous = getattr(uwsgi, "post_fork_hook", None)

    def post_fork_hook() -> None:
        _after_fork_in_child()
        if previous is not None:
            previous()

    setattr(uwsgi, "post_fork_hook", post_fork_hook)  # noqa: B010 (a C module)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
atexit.register(flush)
