"""The process's life: every thread sigtrace runs, the fork hook and the exit hook.

Other modules describe what they run as a :class:`Component` (start, stop,
what to do around a fork and at exit) and hand it to :func:`acquire`; the
last :func:`release` of a component stops it. Nothing else in sigtrace starts
a thread, registers a fork hook or an exit hook.

* **Locks.** A :class:`ForkSafeLock` is renewed in a forked child: a
  parent's thread may have held it at the fork, and the child, where that
  thread does not run, would wait for it forever. (The metric values' many
  small locks are renewed by :data:`sigtrace.metrics.TALLIER`.)
* **Threads.** :func:`spawn` starts a named daemon thread; :class:`Periodic`
  runs a function every ``interval`` seconds on one, and stops it through an
  event (never a sleep).
* **Fork.** One ``os.register_at_fork`` hook, registered at import, acts on
  the components running at the fork: ``before_fork`` in reverse order in the
  parent, ``after_fork_in_child`` in order in the child, where no thread of
  the parent runs and any lock a parent's thread held is still held: each
  component renews its locks and restarts its threads there. uWSGI forks its
  workers from C, where Python's fork hooks do not run: the same child hook
  is chained onto ``uwsgi.post_fork_hook`` (what ``uwsgidecorators.postfork``
  sets), and runs once per process whichever of the two calls it.
* **Exit.** One ``atexit`` hook, registered while any component runs and
  unregistered with the last one, calls each component's ``at_exit`` in
  reverse order.

With no component running, sigtrace has no thread, and its fork hook (which
Python cannot unregister) only renews the :class:`ForkSafeLock` s.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import typing as t
import weakref
from dataclasses import dataclass

__all__ = [
    "Component",
    "ForkSafeLock",
    "Order",
    "Periodic",
    "acquire",
    "release",
    "running",
    "spawn",
]

log = logging.getLogger("sigtrace")

Action = t.Callable[[], object]


def _nothing() -> None:
    return None


class Order:
    """Where a component runs relative to the others: started and forked in
    increasing order, stopped, exited and prepared for a fork in decreasing order.

    Metrics come first so that in a forked child their locks are new (and the
    parent's values gone) before anything that reads them runs again.
    """

    METRICS = 10
    PUBLISHER = 20
    OTLP_METRICS = 30
    SERVER = 40
    TRACING = 50


@dataclass(frozen=True, eq=False)
class Component:
    """What sigtrace runs for the process: one of each, shared by its users.

    :param name: for logs and :func:`running`.
    :param order: see :class:`Order`.
    :param start: called by the first :func:`acquire`.
    :param stop: called by the last :func:`release`.
    :param before_fork: in the parent, just before a fork.
    :param after_fork_in_child: in a forked child, first thing: renew locks,
        forget what the child must not inherit, restart threads.
    :param at_exit: at interpreter exit (the component is then forgotten).
    """

    name: str
    order: int
    start: Action = _nothing
    stop: Action = _nothing
    before_fork: Action = _nothing
    after_fork_in_child: Action = _nothing
    at_exit: Action = _nothing


class ForkSafeLock:
    """A ``threading.Lock`` (or ``RLock``) that a forked child gets new.

    ``with lock:``, ``acquire()`` and ``release()`` as the lock's own.
    """

    __slots__ = ("__weakref__", "_factory", "_lock", "acquire", "release")

    def __init__(self, reentrant: bool = False) -> None:
        self._factory: t.Callable[[], t.Any] = threading.RLock if reentrant else threading.Lock
        self._renew()
        _locks.add(self)

    def _renew(self) -> None:
        self._lock = self._factory()
        self.acquire: t.Callable[..., bool] = self._lock.acquire
        self.release: t.Callable[[], None] = self._lock.release

    def __enter__(self) -> bool:
        return bool(self._lock.acquire())

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


_locks: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


class _Lifecycle:
    """The running components and their users; the one state of this module."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users: dict[Component, int] = {}
        self.pid = os.getpid()
        self.exit_hooked = False
        self.uwsgi_hooked = False

    def ordered(self, reverse: bool = False) -> list[Component]:
        # Without the lock: the fork hook must not wait for a thread that
        # holds it (list() copies the keys in one step under the GIL).
        return sorted(list(self.users), key=lambda c: c.order, reverse=reverse)


_state = _Lifecycle()


def acquire(component: Component) -> None:
    """Count one user of ``component``; the first one starts it.

    An exception of ``start`` reaches the caller and leaves it stopped.
    """
    with _state.lock:
        users = _state.users.get(component, 0)
        if users:
            _state.users[component] = users + 1
            return
        component.start()
        _state.users[component] = 1
        if not _state.exit_hooked:
            atexit.register(_at_exit)
            _state.exit_hooked = True
        _hook_uwsgi_fork()


def release(component: Component) -> bool:
    """Undo one :func:`acquire`; the last one stops ``component`` and returns True.

    Extra calls do nothing (and return False).
    """
    with _state.lock:
        users = _state.users.get(component, 0)
        if users > 1:
            _state.users[component] = users - 1
            return False
        if not users:
            return False
        del _state.users[component]
        if not _state.users and _state.exit_hooked:
            atexit.unregister(_at_exit)
            _state.exit_hooked = False
        # under the lock: an acquire racing this one starts it after this stop
        _call(component, "stop", component.stop)
    return True


def running() -> list[str]:
    """The names of the running components, in start order."""
    return [component.name for component in _state.ordered()]


def _call(component: Component, what: str, action: Action) -> None:
    try:
        action()
    except Exception:
        log.warning("sigtrace: %s of %s failed", what, component.name, exc_info=True)


def _before_fork() -> None:
    for component in _state.ordered(reverse=True):
        _call(component, "before_fork", component.before_fork)


def _after_fork_in_child() -> None:
    if _state.pid == os.getpid():
        return  # ran already in this process (Python's hook, then uWSGI's)
    _state.pid = os.getpid()
    _state.lock = threading.RLock()  # a parent's thread may have held it at the fork
    for lock in list(_locks):
        lock._renew()
    for component in _state.ordered():
        _call(component, "after_fork_in_child", component.after_fork_in_child)


def _at_exit() -> None:
    with _state.lock:
        components = sorted(_state.users, key=lambda c: c.order, reverse=True)
        _state.users.clear()
        _state.exit_hooked = False
    for component in components:
        _call(component, "at_exit", component.at_exit)


def _hook_uwsgi_fork() -> None:
    """Inside uWSGI: run the child hook in every worker it forks from C.

    ``uwsgi.post_fork_hook`` is the python plugin's one post-fork callable; an
    existing one is chained. Hooked once per process, when the first
    component starts (it stays: uWSGI has no way to take it back).
    """
    uwsgi = sys.modules.get("uwsgi")  # present only inside a uWSGI process
    if uwsgi is None or _state.uwsgi_hooked:
        return
    _state.uwsgi_hooked = True
    previous = getattr(uwsgi, "post_fork_hook", None)

    def post_fork_hook() -> None:
        _after_fork_in_child()
        if previous is not None:
            previous()

    setattr(uwsgi, "post_fork_hook", post_fork_hook)  # noqa: B010 (a C module)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def spawn(name: str, target: Action) -> threading.Thread:
    """Start ``target`` on a daemon thread called ``name`` (all start with ``sigtrace-``)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


class Periodic:
    """Calls ``tick`` every ``interval`` seconds on its own thread until stopped.

    ``final``, if given, runs on that thread after the last wait (Python 3.12
    starts no thread in an ``atexit`` hook, so a last action at exit must run
    on a thread started earlier). An exception of ``tick`` is logged and the
    thread goes on.
    """

    def __init__(
        self, name: str, interval: float, tick: Action, final: Action | None = None
    ) -> None:
        self.name = name
        self.interval = interval
        self.tick = tick
        self.final = final
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_final = True

    def start(self) -> None:
        """Start the thread (a new one: after a fork the parent's does not run here)."""
        self._stop = threading.Event()
        self._run_final = True
        self._thread = spawn(self.name, self._run)

    def _run(self) -> None:
        stop = self._stop
        while not stop.wait(self.interval):
            self._safely(self.tick)
        if self.final is not None and self._run_final:
            self._safely(self.final)

    def _safely(self, action: Action) -> None:
        try:
            action()
        except Exception:
            log.warning("sigtrace: %s failed", self.name, exc_info=True)

    def stop(self, timeout: float, final: bool = True) -> bool:
        """Stop the thread and wait for it at most ``timeout`` seconds.

        Runs ``final`` (when ``final`` is true) on the thread, or here when the
        thread is not running. Returns whether the thread is gone.
        """
        self._run_final = final
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        if final and self.final is not None:
            self._safely(self.final)
        return True
