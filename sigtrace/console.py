"""A readable one-line-per-span form for the console exporter (the demo)."""

from __future__ import annotations

import typing as t

__all__ = ["format_span"]


def format_span(span: t.Any) -> str:
    """``trace_id span_id <- parent  name  kind  duration  attributes`` plus a newline."""
    context = span.get_span_context()
    parent = span.parent.span_id if span.parent is not None else 0
    duration_us = (span.end_time - span.start_time) / 1000 if span.end_time else 0.0
    attributes = " ".join(f"{k}={v}" for k, v in (span.attributes or {}).items())
    status = span.status.status_code.name
    return (
        f"[span] {context.trace_id:032x} {context.span_id:016x} <- {parent:016x} "
        f"{span.name!r} {span.kind.name} {duration_us:.0f}us {status} {attributes}\n"
    )
