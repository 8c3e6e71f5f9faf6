"""Signal and receiver names: cached, bounded, never raising.

Names become Prometheus label values and span attributes, so they must be
cheap to get on every send, stable across processes and free of memory
addresses. Everything here is defensive: a receiver whose attributes raise or
lie (mocks, proxies, C callables) gets a fallback name, never an exception.
"""

from __future__ import annotations

import functools
import sys
import types
import typing as t
import weakref

from blinker import NamedSignal, Signal

from .identity import IdentityCache

__all__ = [
    "ANONYMOUS_SIGNAL",
    "EMPTY_NAME",
    "MAX_NAME_LENGTH",
    "UNKNOWN_RECEIVER",
    "ReceiverInfo",
    "clean_label",
    "later_signal_name",
    "receiver_info",
    "signal_name",
]

ANONYMOUS_SIGNAL = "anonymous"
"""Name of an anonymous ``Signal()`` whose owner could not be found cheaply."""

UNKNOWN_RECEIVER = "unknown"
"""Name of a receiver whose module and qualified name could not be read."""

EMPTY_NAME = "_empty_"
"""Stands for an empty signal name: an empty label value means "no label"."""

MAX_NAME_LENGTH = 200
"""Names longer than this are cut, so one odd name cannot bloat every scrape."""

_MAX_UNWRAP = 8  # partial(partial(...)) depth followed before giving up


def clean_label(value: str) -> str:
    """Return ``value`` bounded in length, without control characters, never empty."""
    if not value:
        return EMPTY_NAME
    if len(value) > MAX_NAME_LENGTH:
        value = value[:MAX_NAME_LENGTH]
    if not value.isprintable():
        value = "".join(ch if ch.isprintable() else "?" for ch in value)
    return value


class ReceiverInfo:
    """What the traced send needs to know about one receiver, computed once."""

    __slots__ = ("__weakref__", "is_coroutine", "name")

    def __init__(self, name: str, is_coroutine: bool) -> None:
        self.name = name
        self.is_coroutine = is_coroutine


# id(identity object) -> ReceiverInfo. Entries are removed by a weakref callback
# when the identity object dies, before its id can be reused; objects that
# cannot be weakly referenced are never cached (their info is recomputed).
_receivers: IdentityCache[ReceiverInfo] = IdentityCache()


def _identity(receiver: t.Any) -> t.Any:
    """The object a receiver's name depends on: a bound method's function.

    blinker yields a fresh bound method object on every send for weakly
    connected methods, so caching by the method itself would never hit.
    """
    if type(receiver) is types.MethodType:
        return receiver.__func__
    return receiver


def receiver_info(receiver: t.Any) -> ReceiverInfo:
    """Return the cached :class:`ReceiverInfo` for ``receiver``; never raises."""
    key = _identity(receiver)
    info = _receivers.get(id(key))
    if info is not None:
        return info
    info = ReceiverInfo(receiver_name(receiver), _is_coroutine(receiver))
    _receivers.put(key, info)  # not weakly referenceable: not cached
    return info


def _is_coroutine(receiver: t.Any) -> bool:
    # blinker's own test, evaluated once per receiver instead of once per send.
    # Not guarded: where it raises (Mock(spec=function), a proxy whose
    # attributes raise) blinker's send raises the same, and so must ours.
    from inspect import iscoroutinefunction

    return iscoroutinefunction(receiver)


def receiver_name(receiver: t.Any) -> str:
    """``module.qualname`` of the code a receiver runs; a fallback on any failure."""
    try:
        return clean_label(_qualified_name(receiver, 0))
    except Exception:
        return UNKNOWN_RECEIVER


def _qualified_name(obj: t.Any, depth: int) -> str:
    kind = type(obj)
    if kind is types.MethodType:
        return _qualified_name(obj.__func__, depth)
    if kind is functools.partial or isinstance(obj, functools.partial):
        if depth >= _MAX_UNWRAP:
            return UNKNOWN_RECEIVER
        return _qualified_name(obj.func, depth + 1)
    if kind is types.FunctionType:
        return _join(obj.__module__, obj.__qualname__)
    if kind is types.BuiltinFunctionType or kind is types.BuiltinMethodType:
        module = obj.__module__
        owner = getattr(obj, "__self__", None)
        if module is None and owner is not None and not isinstance(owner, types.ModuleType):
            module = type(owner).__module__
        return _join(module, obj.__qualname__)
    # Callable objects, mocks and anything odd: read the *type's* attributes,
    # which are plain strings even when the instance fabricates attributes.
    return _join(kind.__module__, kind.__qualname__) + ".__call__"


def _join(module: object, qualname: object) -> str:
    if not isinstance(qualname, str) or not qualname:
        return UNKNOWN_RECEIVER
    if module == "__main__":
        module = _main_module_name()
    if isinstance(module, str) and module:
        return f"{module}.{qualname}"
    return qualname


def _main_module_name() -> str:
    """``python -m app.mail`` runs app.mail as __main__: label it as when imported."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    return name if isinstance(name, str) and name else "__main__"


def signal_name(signal: Signal, sender: t.Any = None) -> str:
    """Label for ``signal``: blinker's name, or the attribute an anonymous one sits in.

    For an anonymous signal the owner is looked for, once, where it is cheap to
    look, whatever the sender: the sender's class hierarchy
    (``Processor.on_ready.send(self)``), the calling module's globals, then the
    classes the calling module can see: those among its globals and those of
    the modules among its globals, with their bases (``Job.finished.send(None)``
    from another module that imported ``Job`` or ``jobs``). The first hit gives
    ``module.Class.attr`` or ``module.attr``; otherwise :data:`ANONYMOUS_SIGNAL`.
    """
    try:
        if isinstance(signal, NamedSignal) and isinstance(signal.name, str):
            return clean_label(signal.name)
        found = _owner_attribute(signal, sender)
        return clean_label(found) if found else ANONYMOUS_SIGNAL
    except Exception:
        return ANONYMOUS_SIGNAL


def later_signal_name(signal: Signal, sender: t.Any, tried: weakref.WeakSet[type]) -> str | None:
    """For a signal whose first send left it :data:`ANONYMOUS_SIGNAL`: its name
    found through a later send's sender class, else None; never raises.

    Meant to be called on the sends of a signal bound as anonymous: each sender
    type is looked through once per signal (``tried`` remembers them, then it
    is one set lookup). The caller starts recording under the new name; the
    ``anonymous`` series keeps its value and stops growing, which Prometheus
    does not read as a reset.
    """
    if sender is None:
        return None
    try:
        kind = sender if isinstance(sender, type) else type(sender)
        if kind in tried:
            return None
        tried.add(kind)
        found = _class_attribute(signal, kind)
        return clean_label(found) if found else None
    except Exception:
        return None


def _class_attribute(signal: Signal, owner: type) -> str | None:
    """``module.Class.attr`` of the class in ``owner``'s MRO that holds ``signal``."""
    for klass in owner.__mro__:
        for attr, value in vars(klass).items():
            if value is signal:
                return f"{klass.__module__}.{klass.__qualname__}.{attr}"
    return None


def _any_class_attribute(signal: Signal, owner: type) -> str | None:
    """:func:`_class_attribute` for a class found by looking around: one whose
    metaclass breaks ``__mro__`` or ``vars()`` is skipped, not fatal to the search."""
    try:
        return _class_attribute(signal, owner)
    except Exception:
        return None


def _visible_class_attribute(signal: Signal, namespace: dict[str, t.Any]) -> str | None:
    """A class attribute holding ``signal`` in a class of ``namespace`` (a module's
    globals) or of a module among them: one level, no recursion into packages.
    Reads ``vars()`` only: no attribute access that could run user code."""
    modules: list[dict[str, t.Any]] = []
    seen: set[int] = set()
    for value in list(namespace.values()):
        if isinstance(value, type):
            if id(value) not in seen:
                seen.add(id(value))
                found = _any_class_attribute(signal, value)
                if found:
                    return found
        elif isinstance(value, types.ModuleType):
            modules.append(vars(value))
    for module_globals in modules:
        for value in list(module_globals.values()):
            if isinstance(value, type) and id(value) not in seen:
                seen.add(id(value))
                found = _any_class_attribute(signal, value)
                if found:
                    return found
    return None


def _owner_attribute(signal: Signal, sender: t.Any) -> str | None:
    if sender is not None:
        owner = sender if isinstance(sender, type) else type(sender)
        found = _class_attribute(signal, owner)
        if found:
            return found
    # Never touch frame.f_locals: on a running frame it snapshots the locals
    # into the frame and would keep the caller's objects alive.
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        ("sigtrace.", "blinker")
    ):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return None
    namespace = frame.f_globals
    for attr, value in list(namespace.items()):
        if value is signal:
            return f"{namespace.get('__name__', '')}.{attr}"
    return _visible_class_attribute(signal, namespace)
