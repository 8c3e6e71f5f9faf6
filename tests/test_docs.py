"""The README and docs/: every Python example runs, every link and key is real.

Each fenced ``python`` block of ``README.md`` and ``docs/*.md`` runs in a fresh
interpreter from the repository root, with no ``OTEL_*``, ``SIGTRACE_*`` or
multiprocess variable set, and must exit 0 (the examples carry their own
asserts). A block that cannot run as written is marked on the line before it
with ``<!-- doc-test: not run: <reason> -->``. ``make docs`` builds the pages
with warnings as errors; these tests need no Sphinx.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sigtrace.config import KEYS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"<!-- doc-test: not run: \S.*-->\s*$")
EXAMPLE_TIMEOUT = 120


def examples() -> list[pytest.param]:
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").rpartition("\n")[2]
            if NOT_RUN.search(before):
                continue
            line = text.count("\n", 0, match.start()) + 1
            out.append(pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}:{line}"))
    return out


EXAMPLES = examples()


def test_the_readme_and_the_docs_have_examples_to_run() -> None:
    ids = [param.id for param in EXAMPLES]
    assert any(i.startswith("README.md:") for i in ids), ids
    assert any(i.startswith("docs/") for i in ids), ids


@pytest.mark.parametrize("code", EXAMPLES)
def test_example_runs(code: str) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OTEL_", "SIGTRACE_", "PROMETHEUS_MULTIPROC"))
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_is_read_in_five_minutes() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; the rest belongs in docs/"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(page: Path) -> None:
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_the_docs_name_only_configuration_keys_that_exist() -> None:
    for page in PAGES:
        for key in set(re.findall(r"\bSIGTRACE_[A-Z_]*[A-Z]\b", page.read_text(encoding="utf-8"))):
            assert key in KEYS, f"{page.relative_to(ROOT)} names {key}, which is no key"


def test_the_configuration_reference_lists_every_key_with_what_it_accepts() -> None:
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import sigtrace_config
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    rows = {row[0]: row for row in sigtrace_config.rows()}
    assert list(rows) == list(KEYS)
    for name, _default, accepted, meaning in rows.values():
        assert accepted != "any value" and meaning, name
    table = sigtrace_config.markdown_table()
    assert "| `SIGTRACE_METRICS_TOKEN` | unset | a non-empty token" in table
    assert "| `SIGTRACE_SPANS` | `all` | one of 'all'" in table
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert "```{sigtrace-config-keys}" in page


def test_the_metrics_page_documents_every_metric_with_its_type_and_labels() -> None:
    from prometheus_client import CollectorRegistry

    from sigtrace import multiprocess_directory, tracing
    from sigtrace.metrics import MetricSet

    page = (DOCS / "metrics.md").read_text(encoding="utf-8")
    rows = {
        cells[0].strip("` "): cells[1:3]
        for cells in (line.strip("|").split("|") for line in page.splitlines())
        if cells[0].strip().startswith("`sigtrace_")
    }
    families = MetricSet(CollectorRegistry()).families
    # the one family served only under PROMETHEUS_MULTIPROC_DIR, next to the six
    errors = multiprocess_directory.errors_family()
    documented = {
        **{family.name: (family.kind, family.labelnames) for family in families},
        f"{errors.name}_total": (errors.type, errors._labelnames),
    }
    assert set(rows) == set(documented)
    for name, (kind, labelnames) in documented.items():
        kind_cell, labels_cell = (cell.strip() for cell in rows[name])
        assert kind_cell == kind, name
        assert labels_cell == ", ".join(f"`{label}`" for label in labelnames), name
    attributes = [
        value
        for name, value in vars(tracing).items()
        if name.startswith("ATTR_") and isinstance(value, str)
    ]
    assert attributes
    for attribute in attributes:
        assert f"`{attribute}" in page, f"span attribute {attribute} is not in docs/metrics.md"
