"""The layout docs/ARCHITECTURE.md promises: no module imports the package root.

A module that reached ``sigtrace/__init__.py`` for a name would import the
extension, the CLI and everything else with it, and run into import cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sigtrace"


def test_no_module_imports_the_package_root() -> None:
    # what `from . import x` may name at the root: its modules and its subpackages (ui)
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    modules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        name = str(path.relative_to(PACKAGE))
        to_root = len(path.relative_to(PACKAGE).parts)  # `from . import` (..) reaches the root
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == to_root and node.module is None:
                found += [f"{name}: {a.name}" for a in node.names if a.name not in modules]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "sigtrace":
                found.append(f"{name}: from sigtrace import ...")
            elif isinstance(node, ast.Import) and any(a.name == "sigtrace" for a in node.names):
                found.append(f"{name}: import sigtrace")
    assert "ui" in modules and not found, found
