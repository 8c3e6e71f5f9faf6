"""Declared versions: pyproject's floors are what CI installs, the dev extra fits every Python.

CI (``.ci/run``) runs the suite on every supported Python with the latest
dependencies, and once with exactly the floors pinned in ``.ci/lowest.txt``
(``EXPECT_CONSTRAINTS`` names that file, so the run checks it got them).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
import typing as t
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOWEST = ROOT / ".ci" / "lowest.txt"


def project() -> dict[str, t.Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return t.cast(dict[str, t.Any], tomllib.load(file)["project"])


def dependencies() -> list[Requirement]:
    return [Requirement(line) for line in project()["dependencies"]]


def floors() -> dict[str, Version]:
    """The lower bound (``>=``) of every runtime dependency, by canonical name."""
    out: dict[str, Version] = {}
    for requirement in dependencies():
        lower = [spec for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{requirement}: needs exactly one '>=' floor"
        out[canonicalize_name(requirement.name)] = Version(lower[0].version)
    return out


def pins(path: Path) -> dict[str, Version]:
    """``name==version`` lines of a pip constraints file, by canonical name."""
    out: dict[str, Version] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not a '==' pin"
            out[canonicalize_name(name)] = Version(version)
    return out


def test_the_floors_file_pins_exactly_pyproject_s_floors() -> None:
    assert pins(LOWEST) == floors()


def test_installed_versions_are_declared_ones_and_the_pins_when_ci_gives_them() -> None:
    for requirement in dependencies():
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{requirement.name} {installed} is outside {requirement}"
        )
    expected = os.environ.get("EXPECT_CONSTRAINTS")
    if expected:
        installed_versions = {
            name: Version(importlib.metadata.version(name)) for name in pins(ROOT / expected)
        }
        assert installed_versions == pins(ROOT / expected)


def test_opentelemetry_floors_are_one_release() -> None:
    """The SDK pins its API and semantic conventions exactly: floors that are not
    one release (1.N with 0.(N+21)b0) cannot be installed together."""
    bounds = floors()
    stable = {
        bounds[name] for name in bounds if re.fullmatch(r"opentelemetry-(api|sdk|exp.*)", name)
    }
    beta = {
        bounds[name]
        for name in ("opentelemetry-semantic-conventions", "opentelemetry-instrumentation")
    }
    assert len(stable) == 1 and len(beta) == 1, (stable, beta)
    (release,), (contrib,) = stable, beta
    assert contrib == Version(f"0.{release.minor + 21}b0"), (release, contrib)


def dev_requirement(name: str) -> Requirement:
    (found,) = [
        Requirement(line)
        for line in project()["optional-dependencies"]["dev"]
        if canonicalize_name(Requirement(line).name) == name
    ]
    return found


def test_the_dashboard_sdk_is_required_only_where_it_installs() -> None:
    marker = dev_requirement("grafana-foundation-sdk").marker
    assert isinstance(marker, Marker)
    assert not marker.evaluate({"python_version": "3.10"})
    for minor in ("3.11", "3.12", "3.13"):
        assert marker.evaluate({"python_version": minor}), minor
    installed = importlib.util.find_spec("grafana_foundation_sdk") is not None
    assert installed == (sys.version_info >= (3, 11))


def test_the_dashboard_generator_tests_skip_only_below_3_11() -> None:
    from tests import conftest

    skipped = conftest.generate is None
    assert skipped == (sys.version_info < (3, 11))
    assert "requires Python >= 3.11" in conftest.GENERATOR_SKIP_REASON


def test_ci_runs_every_supported_python_and_ends_no_process_by_name() -> None:
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    match = re.search(r"^MINORS=\(([^)]*)\)$", script, re.MULTILINE)
    assert match, "MINORS=(...) in .ci/run"
    minors = match.group(1).split()
    classifiers = [
        c.rsplit(" :: ", 1)[1]
        for c in project()["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    ]
    assert minors == classifiers
    assert project()["requires-python"] == f">={minors[0]}"
    assert "lowest.txt" in script
    for word in ("pkill", "killall"):
        assert word not in script, word
