"""The publisher: writes this process's metric values to its file in the directory.

Every process records into its own memory (:class:`sigtrace.metrics.MetricSet`):
no lock and no file write per observation. With ``PROMETHEUS_MULTIPROC_DIR``
set, a :class:`Publisher` writes a snapshot of those values to the process's
own file (:mod:`sigtrace.multiprocess_directory`), and any process's scrape
sums every file.

**When.** From a process's first request on (where it also warns about
files of an earlier server run, unless gunicorn's ``on_starting`` emptied the
directory), a daemon thread publishes every ``interval`` seconds
(``SIGTRACE_PUBLISH_INTERVAL``, 0.1 to 60, default 1 s), and only when a value
changed; a scrape served by a worker publishes that worker's values first; a
graceful exit publishes the last values (the exit hook of
:mod:`sigtrace.lifecycle`, and gunicorn's ``worker_exit`` hook). A process
killed with SIGKILL loses what it recorded since its last publish: at most one
interval.

The publisher starts at a process's first request (the extension's request
hook; one attribute check per request afterwards), never at ``init_app``:
``flask sigtrace signals`` and other commands that build the app never write
into the directory. A process that forks (a gunicorn ``--preload`` master)
publishes what it recorded before its first fork, once, so sends made while
importing the app count exactly once; its children start from zero.

**Failures.** A publish that cannot write (the directory removed, read-only,
or the disk full) keeps the values in memory, counts in
``sigtrace_multiprocess_errors_total`` and retries at the next interval; a
removed directory is recreated (0700) when its parent allows it. As every
file holds the process's values since it started, a later publish writes
them all, nothing twice. A graceful exit that cannot write logs how many
values were lost.

**Forks.** A forked child must not publish its parent's values as its own:
the publisher's fork handling resets the copied values in the child and gives
it a new file. uWSGI forks its workers from C, where Python's fork hooks do
not run: :mod:`sigtrace.lifecycle` chains the same child hook onto
``uwsgi.post_fork_hook``, and the publisher also compares the pid it belongs
to with ``os.getpid()`` when it starts. As a uWSGI master never published,
each child first writes the values it copied to the master's file, under the
master's name. (This is why :data:`sigtrace.metrics.TALLIER`, which runs
first in a child, leaves the values of a published set to the publisher.)

**Threads.** uWSGI runs no Python thread unless started with
``--enable-threads`` (or ``--threads``): without them, values are published at
the end of a request at most once per interval, and at exit.

**Process life.** :data:`PUBLISHING` is the publishers'
:class:`sigtrace.lifecycle.Component`: :func:`attach` acquires it (one user
per app's ``init_app``), :func:`detach` releases it (``SigTrace.close()``),
and the last release stops every publisher of the process after publishing
its last values; a later request of a new ``init_app`` starts them again.
Its thread (``sigtrace-publisher``) is a :class:`sigtrace.lifecycle.Periodic`
started by :meth:`Publisher.ensure_started` (at a request).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import sys
import threading
import time
import typing as t
from collections.abc import Iterator

from . import lifecycle
from . import multiprocess_directory as mpdir
from . import multiprocess_format as fmt

if t.TYPE_CHECKING:
    from .metrics import MetricSet

__all__ = [
    "DEFAULT_INTERVAL",
    "MAX_INTERVAL",
    "MIN_INTERVAL",
    "PUBLISHING",
    "Publisher",
    "attach",
    "check_at_init",
    "detach",
    "local_documents",
    "mark_checked",
    "publish_all",
    "stop_all",
]

log = logging.getLogger("sigtrace")

DEFAULT_INTERVAL = 1.0
"""Seconds between two publishes of one process (``SIGTRACE_PUBLISH_INTERVAL``)."""
MIN_INTERVAL = 0.1
MAX_INTERVAL = 60.0
_STOP_TIMEOUT = 5.0  # seconds to wait for the thread's publish in progress at a stop

_REASONS = {
    errno.ENOENT: "directory_missing",
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
    errno.EACCES: "write_denied",
    errno.EPERM: "write_denied",
    errno.EROFS: "write_denied",
}


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
        self._owner = _owner_of(path)  # to recreate a removed directory as it was
        self._new_process_state()

    def _new_process_state(self) -> None:
        self.name = f"sigtrace-{self._pid}-{secrets.token_hex(6)}.json"  # this process's file
        self.published = False
        self.unpublished = 0.0  # values the last failed publish could not write
        self._last = fmt.document("process", self._pid, [])
        self._lock = threading.Lock()
        self._started = False
        self._thread: lifecycle.Periodic | None = None  # None where no thread runs
        self._due = 0.0  # threadless mode: next publish at a request's end
        self._loss_logged = False

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
            if self.path not in _checked_paths:
                _warn_stale(self.path)  # no on_starting hook cleared the directory
            if _threads_run():
                self._thread = lifecycle.Periodic("sigtrace-publisher", self.interval, self.publish)
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
                document = fmt.process_document(self.metrics, self._pid)
                if document["families"]:
                    mpdir.write_private(self.path, self.name, fmt.encode(document))
            except Exception as error:
                mpdir.report("publish_failed", os.path.join(self.path, self.name), error)
        self._pid = os.getpid()
        self.metrics.reset()  # the child must not count its parent's values again
        self._new_process_state()

    def publish(self) -> bool:
        """Write this process's file if a value changed since the last write,
        and its failure counts' file if they changed.

        Never raises: a failed write keeps the values for the next publish.
        """
        try:
            return self._publish()
        finally:
            mpdir.publish_errors(self.path)

    def _publish(self) -> bool:
        with self._lock:
            if self._pid != os.getpid():
                return False  # a child that has not started yet
            document = None
            try:
                document = fmt.process_document(self.metrics, self._pid)
                if document == self._last:
                    return False
                self._write(fmt.encode(document))
            except Exception as error:
                if document is not None:
                    self.unpublished = fmt.values_in(document) - fmt.values_in(self._last)
                reason = "publish_failed"
                if isinstance(error, OSError) and error.errno in _REASONS:
                    reason = _REASONS[error.errno]
                mpdir.report(
                    reason,
                    os.path.join(self.path, self.name),
                    f"{error!r}; values kept in memory, written at the next publish",
                )
                return False
            self._last, self.published, self.unpublished = document, True, 0.0
            return True

    def _write(self, data: bytes) -> None:
        try:
            mpdir.write_private(self.path, self.name, data)
        except FileNotFoundError:
            if os.path.isdir(self.path) or not mpdir.recreate(self.path, self._owner):
                raise
            log.warning("sigtrace: %s was removed; created it again (0700)", self.path)
            mpdir.write_private(self.path, self.name, data)

    def publish_and_stop(self) -> None:
        """Stop the thread (waiting for it) and publish the last values (graceful
        exit, or the last ``SigTrace.close()``); a later request starts it again.

        Logs how many values are lost when they cannot be written.
        """
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop(_STOP_TIMEOUT, final=False)
        self._started = False
        if not self.publish() and self.unpublished and not self._loss_logged:
            self._loss_logged = True  # worker_exit, then atexit: said once
            log.warning(
                "sigtrace: this process (pid %d) exits without writing its last metrics "
                "to %s: %d recorded values are lost",
                self._pid,
                self.path,
                self.unpublished,
            )


def _owner_of(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_uid, info.st_gid


# Publishers live as long as the process (a later init_app restarts them); keyed by
# the id of their MetricSet, which they keep alive.
_publishers: dict[int, Publisher] = {}
_publishers_lock = lifecycle.ForkSafeLock()  # renewed in a forked child by lifecycle
_checked_paths: set[str] = set()  # checked by the server's master at start


def mark_checked(path: str) -> None:
    """The server's master checked ``path`` at start (gunicorn's ``on_starting``).

    A worker that boots later finds a removed or read-only directory a run-time
    fault: it warns and keeps its values in memory instead of refusing to boot.
    """
    _checked_paths.add(path)


def check_at_init(path: str, allow_shared: bool = False) -> None:
    """At ``init_app``: :class:`sigtrace.ConfigError` when ``path`` is unusable.

    Where the server's master checked it at start (:func:`mark_checked`), a
    problem is a run-time fault instead: counted and warned about, and the
    worker boots.
    """
    if allow_shared:
        mpdir.share(path)
    problem = mpdir.directory_problem(path, allow_shared=allow_shared)
    if problem is None:
        return
    if path not in _checked_paths:
        from .config import ConfigError

        raise ConfigError(problem)
    mpdir.report("directory_unusable", path, problem)


def attach(metrics: MetricSet, interval: float = DEFAULT_INTERVAL) -> Publisher | None:
    """The publisher of ``metrics`` in multiprocess mode (one per set), else None.

    Writes nothing: publishing starts with :meth:`Publisher.ensure_started`.
    A publisher returned is one more user of :data:`PUBLISHING`: :func:`detach`
    undoes it.
    """
    path = mpdir.directory()
    if path is None:
        return None
    with _publishers_lock:
        found = _publishers.get(id(metrics))
        if found is None or found.path != path:
            found = _publishers[id(metrics)] = Publisher(metrics, path, interval)
    lifecycle.acquire(PUBLISHING)
    metrics.kept_by_publisher = True
    return found


def detach() -> None:
    """Undo one :func:`attach` that returned a publisher; the last one stops them all."""
    lifecycle.release(PUBLISHING)


def _warn_stale(path: str) -> None:
    try:
        stale = mpdir.stale_files(path)
    except OSError:
        return
    if stale:
        log.warning(
            "sigtrace: %s holds %d file(s) of an earlier server run (%s): their values "
            "are added to this run's totals. Empty the directory before each start "
            "(sigtrace.gunicorn's on_starting hook removes sigtrace's files)",
            path,
            len(stale),
            ", ".join(stale[:5]) + (", ..." if len(stale) > 5 else ""),
        )


def _own_publishers() -> Iterator[Publisher]:
    pid = os.getpid()
    return (p for p in list(_publishers.values()) if p._pid == pid)


def publish_all() -> None:
    """Publish this process's latest values now (a scrape does, before reading)."""
    for publisher in _own_publishers():
        if publisher._started or publisher.published:
            publisher.publish()


def stop_all() -> None:
    """Stop every publisher of this process, each publishing its last values
    (gunicorn's ``worker_exit``, the exit hook and the last :func:`detach`)."""
    for publisher in _own_publishers():
        if publisher._started or publisher.published:
            publisher.publish_and_stop()


def local_documents(path: str) -> list[tuple[str, fmt.Document]]:
    """This process's values for ``path`` from memory: (its file's name, document)."""
    return [
        (publisher.name, fmt.process_document(publisher.metrics, publisher._pid))
        for publisher in _own_publishers()
        if publisher.path == path
    ]


def _before_fork() -> None:
    """A process about to fork workers (gunicorn --preload) publishes what it
    recorded itself, once; its children start from zero."""
    for publisher in _own_publishers():
        if not publisher._started:
            publisher.publish()


def _after_fork_in_child() -> None:
    """In a forked child: the parent's values forgotten, a new file, the thread
    started again where it ran (the locks are new already: lifecycle's)."""
    mpdir.after_fork_in_child()
    pid = os.getpid()
    for publisher in list(_publishers.values()):
        if publisher._pid == pid:
            continue  # adopted already (a request's start after a fork from C)
        was_running = publisher._started
        publisher._adopt_child()
        if was_running:
            publisher._start()


def _stop() -> None:
    """The last :func:`detach`: :func:`stop_all`; the values are the tally's again
    (zeroed by it in a forked child)."""
    stop_all()
    for publisher in _own_publishers():
        publisher.metrics.kept_by_publisher = False


PUBLISHING = lifecycle.Component(
    "sigtrace-publisher",
    lifecycle.Order.PUBLISHER,
    stop=_stop,
    before_fork=_before_fork,
    after_fork_in_child=_after_fork_in_child,
    at_exit=stop_all,
)
"""The publishers of this process: running from the first :func:`attach` to the
last :func:`detach` (threads start at a request, not here)."""
