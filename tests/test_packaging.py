"""What sigtrace declares: exactly the distributions it imports, and its extras.

Each runtime dependency is a distribution some ``sigtrace`` module imports, and
every distribution a module imports is declared (found by parsing the modules and
asking the installed distributions which one owns each imported file). Anything
only some users need is an extra. ``.ci/install-check`` installs the result with
old and new pips and uv; these tests keep the declaration itself honest.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import sys
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.test_versions import ROOT, dependencies, project

PACKAGE = ROOT / "sigtrace"


def imported_modules() -> dict[str, set[str]]:
    """Every absolute import of every sigtrace module (``from a import b`` as
    ``a.b`` when that is a module), mapped to the sigtrace files importing it."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    is_module = find_spec(candidate) is not None
                    names.append(candidate if is_module else node.module)
            for name in names:
                out.setdefault(name, set()).add(path.name)
    return out


def find_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


@cache
def owners() -> dict[Path, str]:
    """Installed file -> canonical name of the distribution that installed it."""
    out: dict[Path, str] = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            out[Path(str(dist.locate_file(file))).resolve()] = canonicalize_name(
                dist.metadata["Name"]
            )
    return out


def owning_distribution(module: str) -> str | None:
    """The distribution a module comes from; None for the standard library and sigtrace."""
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names or top == "sigtrace":
        return None
    spec = find_spec(module)
    assert spec is not None and spec.origin, f"sigtrace imports {module}, which is not installed"
    return owners().get(Path(spec.origin).resolve(), f"<no distribution owns {spec.origin}>")


def test_dependencies_are_exactly_the_distributions_sigtrace_imports() -> None:
    imported: dict[str, set[str]] = {}
    for module, files in imported_modules().items():
        owner = owning_distribution(module)
        if owner is not None:
            imported.setdefault(owner, set()).update(files)
    declared = {canonicalize_name(requirement.name) for requirement in dependencies()}
    undeclared = {name: sorted(files) for name, files in imported.items() if name not in declared}
    unused = declared - set(imported)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert not unused, f"declared but never imported by sigtrace: {sorted(unused)}"


def test_runtime_dependencies_have_no_extras_or_markers() -> None:
    """``flask[async]`` pulled asgiref for everyone; a marker would hide a
    dependency on some platform. Both belong to the app or to an extra."""
    for requirement in dependencies():
        assert not requirement.extras and requirement.marker is None, str(requirement)


def extra(name: str) -> list[Requirement]:
    return [Requirement(line) for line in project()["optional-dependencies"][name]]


def test_opentelemetry_instrumentation_flask_is_the_flask_otel_extra_and_in_dev() -> None:
    (flask_otel,) = extra("flask-otel")
    assert canonicalize_name(flask_otel.name) == "opentelemetry-instrumentation-flask"
    (self_reference,) = [r for r in extra("dev") if canonicalize_name(r.name) == "sigtrace"]
    assert {"flask-otel", "docs"} <= self_reference.extras
    # The dev install has it, so the interoperation tests run (test_instrumentor,
    # test_extension) rather than skip.
    assert importlib.metadata.version("opentelemetry-instrumentation-flask")


def test_ci_checks_installs_with_old_and_new_pips_and_builds_the_docs() -> None:
    """The issue's matrix, so that trimming it to save time shows in review."""
    run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "\n.ci/install-check\n" in run and "\nmake docs\n" in run
    check = (ROOT / ".ci" / "install-check").read_text(encoding="utf-8")
    assert "\nPIPS=(23.2.1 24.0 25.0 latest uv)\n" in check
    assert '\nOLD_PIPS=("22.0.2:3.10" "23.0.1:3.10 3.11")\n' in check  # Ubuntu 22.04, Debian 12
    for needed in ('twine" check --strict', "pip check", "opentelemetry-distro", "[flask-otel]"):
        assert needed in check, needed
    assert "for what in tree wheel sdist; do" in check
