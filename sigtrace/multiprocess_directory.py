"""The multiprocess directory protocol: publish, read, archive, and their failures.

With ``PROMETHEUS_MULTIPROC_DIR`` set, every process that serves requests
publishes its values (:mod:`sigtrace.multiprocess_publisher`) to its own file
in the directory, in the format of :mod:`sigtrace.multiprocess_format`, and a
scrape in any process sums every file.

**Files.** ``sigtrace-<pid>-<nonce>.json`` per process (the random nonce keeps
a new process from overwriting a dead one whose pid the kernel reused),
``sigtrace-archive.json`` for the processes that exited, ``sigtrace.lock``
for the archivers. Every file is created 0600 by :func:`tempfile.mkstemp` in
the directory, or with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (the lock), written
whole and renamed over the old one (``os.replace``): a reader sees the old or
the new document, never half of one, and no planted symlink is ever followed.
A root process (a gunicorn master whose workers run as ``user =``) hands the
files it creates to the directory's owner, so the workers read them.

**Who may own the directory.** At start (:func:`check_directory`) the
directory must be owned by this process's user or root and be writable by no
one else, like OpenSSH's StrictModes. A root process (a master whose workers
run as another user) accepts a private directory of another user, whose files
it then hands to that user; gunicorn's ``on_starting`` hook checks that the
owner is the workers' user (:func:`trust_owner`). A reader opens entries
with ``O_NOFOLLOW | O_NONBLOCK`` and reads only regular files owned by root,
this process's user or the directory's owner.
``SIGTRACE_MULTIPROC_ALLOW_SHARED_DIR`` accepts any directory and reads
every user's files there (:func:`share`), at the risk that a local user who
can write there forges, deletes or reads the metrics.

**Archiving.** The files of processes that no longer exist (``kill(pid, 0)``)
are added into the archive, so after a thousand worker restarts the directory
holds one file per live worker plus the archive. Archiving runs under an
exclusive ``flock`` on ``sigtrace.lock`` in gunicorn's ``child_exit`` hook and
in a scrape that finds a dead process's file. The archive lists the files it
holds and is written before they are deleted, so a pass cut short at any point
counts nothing twice and loses nothing. A lock not had within
:data:`LOCK_TIMEOUT` skips the pass; the next one does the work.

**Reading without a lock.** A reader loads the archive, then every process
file not named in it, then checks that the archive's generation (a number
each archiving pass increments) has not changed; if it did, it starts over.
So each value is counted once, and a reader writes nothing (the CLI can read
a live deployment's directory). After repeated collisions a reader waits for
the shared lock, at most :data:`LOCK_TIMEOUT`.

**Failures.** Nothing in the directory stops a request, a boot, the master or
a scrape. A bad entry (not JSON, the wrong shape, a negative or non-finite
value, a value that went down, a directory, FIFO or symlink named like a
snapshot, another user's file, an unreadable file) is skipped and the rest is
served; a corrupt archive or dead process's file is renamed aside
(``<name>.corrupt-<time>``), not deleted. Each failure counts in
``sigtrace_multiprocess_errors_total{reason}`` of the process that met it and
logs one warning per file and reason per minute. A process writes its counts
to a file of its own (``sigtrace-<pid>-<nonce>.json``, only once it has met a
failure) like its other values, so a scrape serves every process's failures
summed, archived with the rest when the process dies: one total per server,
which a rate or an alert can read. A directory that is gone is
recreated (0700) when the parent allows it; until then a scrape serves the
scraped process's own values from memory.

All processes sharing the directory must share one pid namespace (one host or
one container), since liveness is judged by pid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pwd
import re
import secrets
import stat
import tempfile
import threading
import time
import typing as t
from collections.abc import Callable, Container, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from . import lifecycle
from . import multiprocess_format as fmt

__all__ = [
    "ARCHIVE_NAME",
    "ENV",
    "ERRORS_NAME",
    "LOCK_NAME",
    "LOCK_TIMEOUT",
    "LockTimeout",
    "PublishedTotalsCollector",
    "Reader",
    "after_fork_in_child",
    "archive_dead",
    "check_directory",
    "clear",
    "directory",
    "directory_problem",
    "error_counts",
    "errors_document",
    "errors_family",
    "publish_errors",
    "reader",
    "recreate",
    "report",
    "share",
    "stale_files",
    "trust_owner",
    "write_private",
]

log = logging.getLogger("sigtrace")

ENV = "PROMETHEUS_MULTIPROC_DIR"
ALLOW_SHARED_KEY = "SIGTRACE_MULTIPROC_ALLOW_SHARED_DIR"
ARCHIVE_NAME = "sigtrace-archive.json"
LOCK_NAME = "sigtrace.lock"
LOCK_TIMEOUT = 1.0
"""Seconds an archiver or a reader waits for ``sigtrace.lock`` before giving up."""
WARN_INTERVAL = 60.0
"""Seconds between two warnings about the same file and reason."""
MAX_FILE_BYTES = 64 << 20
"""A process file or archive larger than this is skipped (``too_large``)."""

_PROCESS_FILE = re.compile(r"^sigtrace-(\d+)-([0-9a-f]+)\.json$")
_TEMP_FILE = re.compile(r"^\.sigtrace-tmp-(\d+)-")  # .sigtrace-tmp-<writer pid>-<random>
_READ_ATTEMPTS = 5
_LOCK_POLL = 0.01


def directory() -> str | None:
    """The multiprocess directory, or None outside multiprocess mode."""
    return os.environ.get(ENV) or None


# --------------------------------------------------------------------------
# Errors: counted by reason, warned about at most once a minute per file


ERRORS_NAME = "sigtrace_multiprocess_errors_total"
_ERRORS_HELP = (
    "Multiprocess directory failures the server's processes met, by reason (entries "
    "skipped, writes failed, locks not had in time)."
)


class _Errors:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._warned: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._new_file()

    def _new_file(self) -> None:
        """This process's errors file: a process file holding only these counts."""
        self.pid = os.getpid()
        self.name = f"sigtrace-{self.pid}-{secrets.token_hex(6)}.json"
        self.written: list[fmt.Family] = []  # what the file holds
        self.write_lock = threading.Lock()  # one writer at a time: never an older version last

    def report(self, reason: str, where: str, detail: object) -> None:
        now = time.monotonic()
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1
            last = self._warned.get((reason, where))
            if last is not None and now - last < WARN_INTERVAL:
                return
            if len(self._warned) > 1000:  # bounded: forget old files
                self._warned.clear()
            self._warned[(reason, where)] = now
        log.warning("sigtrace: multiprocess %s: %s: %s", reason, where, detail)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self.counts = {}
        self._new_file()


_errors = _Errors()


def report(reason: str, where: str, detail: object) -> None:
    """Count a failure under ``reason`` and warn (once a minute per ``where``)."""
    _own_errors().report(reason, where, detail)


def error_counts() -> dict[str, int]:
    """This process's failures so far, by reason."""
    return dict(_own_errors().counts)


_reset_lock = lifecycle.ForkSafeLock()  # taken only at a child's first use of its counts


def _own_errors() -> _Errors:
    """This process's counts: a forked child's start from zero, with a file of its own.

    The fork hook resets them where sigtrace's components run; this covers a
    child forked before any ran (a gunicorn master imports this module through
    its hooks) or from C (uWSGI).
    """
    if _errors.pid != os.getpid():
        with _reset_lock:
            if _errors.pid != os.getpid():
                _errors.after_fork_in_child()
    return _errors


def errors_document() -> tuple[str, fmt.Document]:
    """This process's failures so far as a process document, and its file's name."""
    errors = _own_errors()
    counts = error_counts()
    families: list[fmt.Family] = []
    if counts:
        series = [fmt.CounterSeries(labels=[r], value=float(c)) for r, c in sorted(counts.items())]
        families.append(
            fmt.Family(
                name=ERRORS_NAME,
                help=_ERRORS_HELP,
                kind="counter",
                labels=["reason"],
                bounds=[],
                series=series,
            )
        )
    return errors.name, fmt.document("process", errors.pid, families)


def publish_errors(path: str) -> None:
    """Write this process's failure counts to its errors file when they changed.

    Never raises. A failed write is not counted again (the write that failed
    beside it was, and the next call retries).
    """
    try:
        errors = _own_errors()
        if not errors.counts:
            return  # the usual case: one attribute read
        with errors.write_lock:
            name, document = errors_document()
            if document["families"] == errors.written:
                return
            write_private(path, name, fmt.encode(document))
            errors.written = document["families"]
    except Exception as error:
        log.debug("sigtrace: cannot write this process's error counts to %s: %r", path, error)


def errors_family() -> CounterMetricFamily:
    """The errors family, empty: served when no process met a failure."""
    return CounterMetricFamily(ERRORS_NAME, _ERRORS_HELP, labels=["reason"])


# --------------------------------------------------------------------------
# Who may own the directory and the files in it

_trusted_uids: set[int] = set()


def trust_owner(uid: int) -> None:
    """Accept a directory and files owned by ``uid`` (gunicorn's ``user =``)."""
    _trusted_uids.add(uid)


class _AnyOwner:
    """The owners accepted in a directory shared on purpose: anyone."""

    def __contains__(self, uid: object) -> bool:
        return True


_shared_paths: set[str] = set()  # accepted with SIGTRACE_MULTIPROC_ALLOW_SHARED_DIR


def _allowed_owners(directory_uid: int | None = None) -> set[int]:
    owners = {0, os.geteuid(), *_trusted_uids}
    if directory_uid is not None:
        owners.add(directory_uid)
    return owners


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def directory_problem(path: str, *, allow_shared: bool = False) -> str | None:
    """Why ``path`` is not a usable multiprocess directory, or None."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return (
            f"{ENV}={path!r} is not an existing directory: create it (empty, mode 0700, "
            f"owned by the server's user) before starting the server, e.g. "
            f"`mkdir -m 0700 -p {path}`, or unset {ENV} in a single process"
        )
    except OSError as error:
        return f"{ENV}={path!r} cannot be examined: {error}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{ENV}={path!r} is not a directory"
    owner, mode = info.st_uid, stat.S_IMODE(info.st_mode)
    if not allow_shared:
        shared = mode & 0o022
        # A root process (a master whose workers switch user) takes the owner
        # of a private directory for its workers' user and hands it its files;
        # gunicorn's on_starting checks it is that user.
        foreign = os.geteuid() != 0 and owner not in _allowed_owners()
        if shared or foreign:
            problem = "writable by other users" if shared else "owned by another user"
            return (
                f"{ENV}={path!r} is {problem} (owner {_user(owner)}, uid {owner}; mode "
                f"{mode:04o}): anyone who can write there can forge, delete or read this "
                f"server's metrics. Fix: `chown {_user(os.geteuid())} {path} && chmod 0700 "
                f"{path}`, or set {ALLOW_SHARED_KEY}=true to accept it at that risk"
            )
    if not os.access(path, os.W_OK | os.X_OK):
        return (
            f"{ENV}={path!r} is not writable by this process (uid {os.getuid()}; owner "
            f"uid {owner}, mode {mode:04o}): every worker writes its metrics there; make "
            "it writable for the server's user"
        )
    return None


def check_directory(path: str, *, allow_shared: bool = False) -> None:
    """Raise :class:`sigtrace.ConfigError` unless ``path`` is a private, writable directory."""
    from .config import ConfigError

    problem = directory_problem(path, allow_shared=allow_shared)
    if allow_shared:
        share(path)
    if problem is not None:
        raise ConfigError(problem)


def share(path: str) -> None:
    """Read files of any owner in ``path`` (``SIGTRACE_MULTIPROC_ALLOW_SHARED_DIR``)."""
    _shared_paths.add(path)


def _directory_owner(path: str) -> tuple[int, int] | None:
    """The directory's uid and gid, when a root process must hand files to them."""
    if os.geteuid() != 0:
        return None
    info = os.stat(path)
    return None if info.st_uid == 0 else (info.st_uid, info.st_gid)


def recreate(path: str, owner: tuple[int, int] | None) -> bool:
    """Make a removed directory again (0700, ``owner``'s); False when it cannot."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return True
    except OSError:
        return False
    if owner is not None:
        with contextlib.suppress(OSError):
            os.chown(path, *owner)
    return True


# --------------------------------------------------------------------------
# Writing: private files, never through a symlink


def write_private(path: str, name: str, data: bytes) -> None:
    """Write ``data`` as ``path/name``: whole, 0600, under a temporary name, then renamed.

    No fsync: the file must survive its process, not the machine. A failed
    write removes its temporary file and raises :class:`OSError`.
    """
    owner = _directory_owner(path)
    fd, temp = tempfile.mkstemp(prefix=f".sigtrace-tmp-{os.getpid()}-", dir=path)  # 0600
    try:
        with open(fd, "wb") as file:
            if owner is not None:
                os.fchown(file.fileno(), *owner)
            file.write(data)
        os.replace(temp, os.path.join(path, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


class LockTimeout(OSError):
    pass


def _open_lock(path: str, *, exclusive: bool) -> int:
    lock_path = os.path.join(path, LOCK_NAME)
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDWR if exclusive else os.O_RDONLY)
    try:
        fd = os.open(lock_path, flags)
    except FileNotFoundError:
        if not exclusive:
            raise
        try:
            fd = os.open(lock_path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # created meanwhile by another archiver
            fd = os.open(lock_path, flags)
        else:
            owner = _directory_owner(path)
            if owner is not None:
                os.fchown(fd, *owner)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid not in _owners(path):
        os.close(fd)
        raise OSError(errno.EPERM, "not a regular file of the server's users", lock_path)
    return fd


@contextlib.contextmanager
def _locked(path: str, *, exclusive: bool, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold ``sigtrace.lock``; :class:`LockTimeout` after ``timeout`` seconds.

    ``fcntl.flock`` has no timeout: a non-blocking attempt is repeated until
    the deadline.
    """
    fd = _open_lock(path, exclusive=exclusive)
    try:
        deadline = time.monotonic() + timeout
        operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(fd, operation)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        errno.ETIMEDOUT, f"{LOCK_NAME} held by another process for {timeout}s"
                    ) from None
                time.sleep(_LOCK_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------
# Reading: regular files of the server's users only


class _Skipped(Exception):
    def __init__(self, reason: str, detail: object) -> None:
        super().__init__(detail)
        self.reason = reason


def _read_entry(path: str, name: str, owners: Container[int]) -> bytes:
    """The bytes of ``path/name``; :class:`_Skipped` when it must not be read."""
    try:
        fd = os.open(os.path.join(path, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as error:
        reason = "not_regular" if error.errno == errno.ELOOP else "unreadable"
        raise _Skipped(reason, error) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Skipped("not_regular", f"mode {stat.filemode(info.st_mode)}")
        if info.st_uid not in owners:
            raise _Skipped("foreign_owner", f"owned by uid {info.st_uid}")
        if info.st_size > MAX_FILE_BYTES:
            raise _Skipped("too_large", f"{info.st_size} bytes")
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as file:
        try:
            return file.read(MAX_FILE_BYTES + 1)
        except OSError as error:
            raise _Skipped("unreadable", error) from None


def _load(
    path: str, name: str, owners: Container[int], kind: t.Literal["process", "archive"]
) -> fmt.Document:
    try:
        return fmt.parse(_read_entry(path, name, owners), kind)
    except fmt.FormatError as error:
        raise _Skipped(error.reason, error) from None


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


def _set_aside(path: str, name: str) -> None:
    """Rename a corrupt file out of the protocol's way, for a human to look at."""
    aside = f"{name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.rename(os.path.join(path, name), os.path.join(path, aside))


def _owners(path: str) -> Container[int]:
    """Whose files are read in ``path``: root, this process's user, the
    directory's owner, gunicorn's workers' user; anyone's in a shared one."""
    if path in _shared_paths:
        return _AnyOwner()
    return _allowed_owners(os.stat(path).st_uid)


# --------------------------------------------------------------------------
# Archiving the files of dead processes


def archive_dead(path: str) -> int:
    """Add the files of processes that no longer exist into the archive.

    Returns how many process files were archived; 0 when the lock was not had
    within :data:`LOCK_TIMEOUT` (counted as ``lock_timeout``). Cheap when
    there is nothing to archive (one directory listing, one ``kill(pid, 0)``
    per file). Raises :class:`OSError` when the directory cannot be used.
    """
    if not _dead_files(os.listdir(path)):
        return 0
    try:
        with _locked(path, exclusive=True):
            return _archive_locked(path)
    except LockTimeout as error:
        report("lock_timeout", os.path.join(path, LOCK_NAME), error)
        return 0


def _archive_locked(path: str) -> int:
    owners = _owners(path)
    names = set(os.listdir(path))
    try:
        archive = _load(path, ARCHIVE_NAME, owners, "archive")
    except FileNotFoundError:
        archive = fmt.document("archive", None, [])
    except _Skipped as skipped:
        report(f"archive_{skipped.reason}", os.path.join(path, ARCHIVE_NAME), skipped)
        _set_aside(path, ARCHIVE_NAME)
        archive = fmt.document("archive", None, [])
    archived_before = set(archive["archived"])
    totals = fmt.Totals()
    totals.add(archive)
    dead = _dead_files(sorted(names))
    newly = []
    for name in dead:
        if _PROCESS_FILE.match(name) is None or name in archived_before:
            continue
        try:
            document = _load(path, name, owners, "process")
        except FileNotFoundError:
            continue
        except _Skipped as skipped:
            report(skipped.reason, os.path.join(path, name), f"{skipped}; not archived")
            if skipped.reason not in ("foreign_owner", "not_regular"):
                _set_aside(path, name)
            continue
        totals.add(document)
        newly.append(name)
    # Names archived earlier whose deletion did not happen stay listed (and
    # skipped by readers) until they are gone.
    archived = (archived_before & names) | set(newly)
    if newly:
        document = totals.archive(sorted(archived), archive["generation"] + 1)
        write_private(path, ARCHIVE_NAME, fmt.encode(document))
    for name in [*archived, *(n for n in dead if _TEMP_FILE.match(n))]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    return len(newly)


# --------------------------------------------------------------------------
# Reading every process's values


class _ArchiveChanged(Exception):
    pass


class Reader:
    """Reads the sum of the archive and every process file, each counted once.

    Remembers how many values each file held, so a file whose values went
    down (they only grow) is skipped (``decreased``). Reads of one process
    are serialized, so each sees a file's version no older than the last.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def read(self, skip: Iterable[str] = ()) -> fmt.Totals:
        """The totals, without the files named in ``skip``.

        Raises :class:`OSError` when the directory cannot be listed.
        """
        with self._lock:
            return self._read(frozenset(skip))

    def _read(self, skip: frozenset[str]) -> fmt.Totals:
        for _ in range(_READ_ATTEMPTS):
            try:
                return self._read_once(skip)
            except _ArchiveChanged:
                continue  # an archiving pass ran while we read: start over
        try:
            with _locked(self.path, exclusive=False):
                return self._read_once(skip)
        except FileNotFoundError:  # no lock file: no archiver ran after all
            return self._read_once(skip)

    def _archive(self, owners: Container[int], *, first: bool) -> fmt.Document | None:
        try:
            return _load(self.path, ARCHIVE_NAME, owners, "archive")
        except FileNotFoundError:
            return None
        except _Skipped as skipped:
            if first:  # once per read
                where = os.path.join(self.path, ARCHIVE_NAME)
                report(f"archive_{skipped.reason}", where, f"{skipped}; skipped")
            return None

    def _read_once(self, skip: frozenset[str]) -> fmt.Totals:
        owners = _owners(self.path)
        totals = fmt.Totals()
        archive = self._archive(owners, first=True)
        generation = -1 if archive is None else archive["generation"]
        archived: set[str] = set()
        if archive is not None:
            totals.add(archive)
            archived = set(archive["archived"])
        names = sorted(os.listdir(self.path))
        for name in names:
            if _PROCESS_FILE.match(name) is None or name in archived or name in skip:
                continue
            try:
                document = _load(self.path, name, owners, "process")
            except FileNotFoundError:
                continue  # archived meanwhile: the generation check below sees it
            except _Skipped as skipped:
                report(skipped.reason, os.path.join(self.path, name), f"{skipped}; skipped")
                continue
            held = fmt.values_in(document)
            if held < self._seen.get(name, 0.0):
                report(
                    "decreased",
                    os.path.join(self.path, name),
                    f"holds {held:g} values, {self._seen[name]:g} before; skipped",
                )
                continue
            self._seen[name] = held
            totals.add(document)
        for gone in set(self._seen) - set(names):
            del self._seen[gone]
        # An archiving pass that finished meanwhile may have deleted files
        # before we listed them, whose values the archive we read lacks.
        latest = self._archive(owners, first=False)
        if (-1 if latest is None else latest["generation"]) != generation:
            raise _ArchiveChanged
        return totals


_readers: dict[str, Reader] = {}


def reader(path: str) -> Reader:
    """The process's one reader of ``path`` (it remembers values across scrapes)."""
    found = _readers.get(path)
    if found is None:
        found = _readers.setdefault(path, Reader(path))
    return found


def after_fork_in_child() -> None:
    """In a forked child: its own error counts, new readers (and their locks)."""
    _errors.after_fork_in_child()
    _readers.clear()


class PublishedTotalsCollector(Collector):
    """Every process's sigtrace metrics published in ``path``, summed at each collect.

    ``before_read`` runs first (a scrape publishes the scraped process's own
    latest values); ``archive`` archives dead processes' files (a scrape does,
    the CLI reads only). ``local(path)`` gives this process's own values from
    memory, ``(file name, document)`` per publisher: they are served in place
    of the files of those names, so a scrape shows its process's values even
    when they could not be written, and alone when the directory cannot be
    read. This process's failure counts are served from memory too, in place
    of its errors file, counting the failures this very read met; a process
    that publishes (``local`` given) then writes them, so the next scrape,
    whichever process serves it, does not read a lower total.
    """

    def __init__(
        self,
        path: str,
        *,
        archive: bool = True,
        before_read: Callable[[], object] | None = None,
        local: Callable[[str], list[tuple[str, fmt.Document]]] | None = None,
    ) -> None:
        self.path = path
        self._archive = archive
        self._before_read = before_read
        self._local = local
        self._reader = reader(path)

    def collect(self) -> Iterable[t.Any]:
        try:
            if self._before_read is not None:
                self._before_read()
            if self._archive:
                archive_dead(self.path)
        except Exception as error:
            report("archive_failed", self.path, error)
        own = [] if self._local is None else self._local(self.path)
        errors_name = _own_errors().name
        try:
            totals = self._reader.read(skip=[*(name for name, _ in own), errors_name])
        except Exception as error:
            reason = "directory_missing" if isinstance(error, FileNotFoundError) else "read_failed"
            report(reason, self.path, f"{error!r}; serving this process's values only")
            totals = fmt.Totals()
        own.append(errors_document())  # after the read: with the failures it met
        if self._local is not None:
            publish_errors(self.path)
        for _, document in own:
            totals.add(document)
        try:
            families = list(totals.metric_families())
        except Exception as error:  # never a 500: this process's values alone
            report("read_failed", self.path, f"{error!r}; serving this process's values only")
            totals = fmt.Totals()
            for _, document in [*own[:-1], errors_document()]:
                totals.add(document)
            families = list(totals.metric_families())
        yield from families
        if ERRORS_NAME not in totals.families:
            yield errors_family()


# --------------------------------------------------------------------------
# A new server run


def _live_in_this_run(path: str, name: str, owners: Container[int]) -> bool:
    """The file of another live process of this server run (a gunicorn USR2
    upgrade's old workers share the directory and the process group)."""
    match = _PROCESS_FILE.match(name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid() or not _pid_alive(pid):
        return False
    try:
        return _load(path, name, owners, "process")["run"] == fmt.run_id()
    except (OSError, _Skipped):
        return False


def clear(path: str) -> list[str]:
    """Remove sigtrace's files of an earlier run (not prometheus-client's).

    Files of live processes of this run are kept, and the archive and lock
    with them. Returns the names removed.
    """
    owners = _owners(path)
    names = sorted(os.listdir(path))
    live = {name for name in names if _live_in_this_run(path, name, owners)}
    ours = {ARCHIVE_NAME, LOCK_NAME} if not live else set()
    removed = []
    for name in names:
        dead = _PROCESS_FILE.match(name) or name in _dead_files([name])
        if name in live or not (name in ours or dead):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
            removed.append(name)
    return removed


def stale_files(path: str) -> list[str]:
    """sigtrace's files left by an earlier server run (another process group)."""
    owners = _owners(path)
    run = fmt.run_id()
    stale = []
    for name in sorted(os.listdir(path)):
        if name == ARCHIVE_NAME:
            kind: t.Literal["process", "archive"] = "archive"
        elif (match := _PROCESS_FILE.match(name)) and not _pid_alive(int(match.group(1))):
            kind = "process"
        else:
            continue
        try:
            document = _load(path, name, owners, kind)
        except (FileNotFoundError, _Skipped):
            continue  # reported when read
        if document["run"] != run:
            stale.append(name)
    return stale
