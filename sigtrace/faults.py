"""Faults inside sigtrace: logged once per place, never raised to the app."""

from __future__ import annotations

import logging

from .lifecycle import ForkSafeLock

__all__ = ["internal_error"]

log = logging.getLogger("sigtrace")

_lock = ForkSafeLock()
_logged: set[str] = set()


def internal_error(where: str) -> None:
    """Log the exception being handled as a fault of sigtrace in ``where``; never raise.

    Only the process's first fault is a warning: one broken part (a tracer, a
    metric backend) fails in several places, and the log must not fill up.
    """
    try:
        with _lock:
            if where in _logged:
                return
            first = not _logged
            _logged.add(where)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "sigtrace: internal error in %s; the app is unaffected and this is logged once",
            where,
            exc_info=True,
        )
    except Exception:  # pragma: no cover - logging itself broken
        pass
