"""Sphinx configuration: ``make docs`` builds these pages into ``docs/_build/html``."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

from sigtrace.version import __version__  # noqa: E402

project = "sigtrace"
author = "sigtrace contributors"
copyright = "sigtrace contributors"
release = version = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx_click",
    "sigtrace_config",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

html_theme = "furo"
html_title = f"sigtrace {release}"

myst_enable_extensions = ["colon_fence", "deflist"]
# Headings up to ### get anchors, so pages link to each other's sections.
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# The signatures' annotations are strings (``from __future__ import annotations``):
# these name the objects they mean, so the references resolve.
autodoc_type_aliases = {
    "MetricsAuth": "sigtrace.extension.MetricsAuth",
    "RequestHook": "sigtrace.extension.RequestHook",
    "ResponseHook": "sigtrace.extension.ResponseHook",
    "CollectorRegistry": "prometheus_client.CollectorRegistry",
    "trace.TracerProvider": "opentelemetry.trace.TracerProvider",
}

# Nitpicky: every cross-reference must resolve, except to names of other
# libraries and of the standard library: the build runs offline, so there is no
# intersphinx inventory to resolve them against.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"'?(flask|werkzeug|blinker|opentelemetry|prometheus_client|click)(\..*)?'?"),
    # Names those libraries' types go by in sigtrace's string annotations.
    (r"py:class", r"CollectorRegistry|trace\..*"),
    # What Sphinx 9 shows for an annotation that autodoc_type_aliases names.
    (r"py:class", r"TypeAliasForwardRef"),
    # Sphinx 8.1 (the newest for Python 3.10) cannot evaluate these string
    # annotations there and leaves them as written; Sphinx 9 resolves them.
    (r"py:class", r"MetricsAuth|RequestHook|ResponseHook|SpanMode|t\.Any"),
    (r"py:.*", r"(collections|typing|types|contextvars|threading|logging|pathlib|os)\..*"),
]
smartquotes = False  # "" and '' in the tables mean what they say
