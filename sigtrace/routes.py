"""The routes sigtrace adds to an app, refused where they would shadow the app's own.

werkzeug matches a static rule before a variable one and, between equal rules,
the first added, so a route sigtrace adds at a path an app route also answers
(``/metrics``, or ``/order/1`` under ``/order/<int:id>``) silently hides one of
the two, whichever was registered first. :func:`add_route` refuses that both
ways: at ``init_app`` when the app's route exists, and when the app adds one
later. Every route sigtrace adds goes through it.
"""

from __future__ import annotations

import typing as t
from collections.abc import Callable

from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, RequestRedirect, Rule

from .config import ConfigError

__all__ = ["add_route", "check_route"]

_ROUTES_KEY = "sigtrace.routes"
"""``app.extensions`` key: path -> (setting, endpoint) of every route sigtrace added."""

_METHOD = "GET"  # sigtrace's routes answer GET (and HEAD): a collision is over GET


def _answers(url_map: Map, rules: t.Iterable[Rule], path: str) -> Rule | None:
    """The rule among ``rules`` that would answer ``GET path``, if any."""
    probe = Map(
        [rule.empty() for rule in rules],
        converters=url_map.converters,
        strict_slashes=url_map.strict_slashes,
        merge_slashes=url_map.merge_slashes,
    )
    try:
        rule, _ = probe.bind("localhost").match(path, _METHOD, return_rule=True)
    except (NotFound, MethodNotAllowed, RequestRedirect):
        return None  # no rule there, not for GET, or only with a trailing slash
    return rule


def _fix(setting: str) -> str:
    return (
        f"set {setting} (in app.config or the environment) to a path no app route "
        "answers, e.g. '/sigtrace" + ("/metrics'" if "METRICS" in setting else "'") + ", "
        "or rename the app's route"
    )


def check_route(app: t.Any, setting: str, path: str) -> None:
    """Raise :class:`ConfigError` when a route of ``app`` already answers ``GET path``,
    naming ``setting``, the path and the app's rule and endpoint."""
    rule = _answers(app.url_map, app.url_map.iter_rules(), path)
    if rule is not None:
        raise ConfigError(
            f"{setting}={path!r} collides with the app's route {rule.rule!r} (endpoint "
            f"{rule.endpoint!r}): one of them would never be reached; {_fix(setting)}"
        )


def add_route(
    app: t.Any,
    setting: str,
    path: str,
    endpoint: str,
    view: Callable[..., t.Any],
) -> None:
    """Add sigtrace's ``GET`` route ``path`` (configured by ``setting``) to ``app``.

    Raises :class:`ConfigError` if an app route answers that path already; once
    added, an app route added later that would answer it raises too.
    """
    check_route(app, setting, path)
    routes: dict[str, tuple[str, str]] = app.extensions.setdefault(_ROUTES_KEY, {})
    _guard(app.url_map, routes)
    app.add_url_rule(path, endpoint, view, methods=[_METHOD])
    routes[path] = (setting, endpoint)


def _guard(url_map: Map, routes: dict[str, tuple[str, str]]) -> None:
    """Make ``url_map`` refuse a later rule that answers a path of ``routes``."""
    if getattr(url_map, "_sigtrace_guarded", False):
        return
    add = url_map.add

    def guarded_add(rulefactory: t.Any) -> None:
        rules = [rule for rule in rulefactory.get_rules(url_map)]
        ours = {endpoint for _, endpoint in routes.values()}
        for path, (setting, endpoint) in routes.items():
            theirs = [rule for rule in rules if rule.endpoint not in ours]
            rule = _answers(url_map, theirs, path) if theirs else None
            if rule is not None:
                raise ConfigError(
                    f"the app's route {rule.rule!r} (endpoint {rule.endpoint!r}) collides "
                    f"with sigtrace's {setting}={path!r} (endpoint {endpoint!r}), added "
                    f"first: one of them would never be reached; {_fix(setting)}"
                )
        for rule in rules:
            add(rule)

    url_map.add = guarded_add  # type: ignore[method-assign]
    url_map._sigtrace_guarded = True  # type: ignore[attr-defined]
