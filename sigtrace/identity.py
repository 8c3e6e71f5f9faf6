"""A cache keyed by object identity that forgets an entry when its object dies.

Signals and receivers may be unhashable or define ``__eq__`` (blinker itself
keys them by ``id()``), so sigtrace never hashes them either. An ``id`` is
reused once its object is collected, so each entry holds a weak reference
whose callback removes it first. Objects that cannot be weakly referenced are
not cached (the caller computes their value each time).
"""

from __future__ import annotations

import typing as t
import weakref

__all__ = ["IdentityCache"]

V = t.TypeVar("V")


class IdentityCache(t.Generic[V]):
    """``id(obj) -> value`` for live objects; ``get`` is one dict lookup."""

    __slots__ = ("_refs", "_values", "get")

    def __init__(self) -> None:
        self._values: dict[int, V] = {}
        self._refs: dict[int, weakref.ref[t.Any]] = {}
        # The dict's own C method: the hot path's whole lookup is ``get(id(obj))``.
        self.get: t.Callable[[int], V | None] = self._values.get

    def put(self, obj: object, value: V) -> bool:
        """Remember ``value`` for ``obj`` while it lives; False if it can't be weakly referenced."""
        key = id(obj)
        values, refs = self._values, self._refs

        def forget(_ref: weakref.ref[t.Any]) -> None:
            if refs.get(key) is _ref:
                values.pop(key, None)
                refs.pop(key, None)

        try:
            ref = weakref.ref(obj, forget)
        except TypeError:
            return False
        refs[key] = ref
        values[key] = value
        return True

    def live(self) -> list[tuple[t.Any, V]]:
        """The (object, value) pairs whose objects are still alive."""
        pairs = []
        for key, ref in list(self._refs.items()):
            obj = ref()
            value = self._values.get(key)
            if obj is not None and value is not None:
                pairs.append((obj, value))
        return pairs

    def __len__(self) -> int:
        return len(self._values)
