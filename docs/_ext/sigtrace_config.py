"""The ``sigtrace-config-keys`` directive: the configuration reference, from the code.

It renders :data:`sigtrace.config.KEYS`, the table ``init_app`` validates
against, so a key added there appears in the docs with no edit here, and a key
removed there disappears. Per key: its name, its default, what it accepts (the
very words of the error a wrong value gets: each key's parser is called with a
value no parser accepts, and its :class:`TypeError` says what is expected) and
its one-line meaning from the table.
"""

from __future__ import annotations

import math
import typing as t

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

_UNACCEPTABLE = object()  # no parser accepts a bare object


def render_default(value: object) -> str:
    """A default as one would write it in ``app.config`` or the environment."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return f"`{int(value)}`"
    if isinstance(value, tuple):
        if not value:
            return "none"
        if len(value) > 4:
            return f"`{value[0]:g}` … `{value[-1]:g}` ({len(value)} values)"
        return ", ".join(
            f"`{item:g}`" if isinstance(item, float) else f"`{item}`" for item in value
        )
    return f"`{value}`"


def accepts(parse: t.Callable[[object], object]) -> str:
    """What a key accepts, in the words of its parser's error."""
    try:
        parse(_UNACCEPTABLE)
    except TypeError as error:
        return str(error)
    return "any value"


def rows() -> list[tuple[str, str, str, str]]:
    """``(key, default, accepts, meaning)`` for every key ``init_app`` knows."""
    from sigtrace.config import KEYS

    return [
        (
            name,
            render_default(getattr(key, "default", None)),
            accepts(key.parse).replace("|", "\\|"),
            str(getattr(key, "doc", "")).replace("|", "\\|"),
        )
        for name, key in KEYS.items()
    ]


def markdown_table() -> str:
    lines = ["| key | default | accepts | meaning |", "| --- | --- | --- | --- |"]
    lines += [
        f"| `{name}` | {default} | {accepted} | {doc} |" for name, default, accepted, doc in rows()
    ]
    return "\n".join(lines)


class ConfigKeys(SphinxDirective):
    """Parses :func:`markdown_table` into the page (a MyST page: the table is Markdown)."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        container = nodes.container(classes=["sigtrace-config-keys"])
        source = self.get_source_info()[0]
        table = StringList(markdown_table().splitlines(), source=source)
        self.state.nested_parse(table, self.content_offset, container)
        return [container]


def setup(app: Sphinx) -> dict[str, t.Any]:
    app.add_directive("sigtrace-config-keys", ConfigKeys)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
