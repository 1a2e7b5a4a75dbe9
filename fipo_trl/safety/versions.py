"""The versions of TRL and its stack that fipo_trl supports.

They are declared once, in pyproject.toml's dependencies, and read back here from fipo_trl's package metadata, so the
install, the import check and the error messages can never disagree. docs/compatibility.md says which combinations
CI tests.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

CHECKED_PACKAGES = ("trl", "transformers", "accelerate", "peft", "datasets")


def _requirement_lines() -> list[str]:
    """pyproject.toml's dependencies: read from the file in a source checkout (an editable install's metadata is a
    copy made at install time, which goes stale when the file changes), else from the installed package's metadata."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "fipo_trl":
            return project.get("dependencies", [])
    try:
        return importlib.metadata.requires("fipo_trl") or []
    except importlib.metadata.PackageNotFoundError:
        return []


def _requirements() -> dict[str, Requirement]:
    """fipo_trl's own requirements (extras left out), by package name."""
    lines, requirements = _requirement_lines(), {}
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            requirements[requirement.name.lower()] = requirement
    return requirements


def supported_range(package: str) -> str:
    """The requirement fipo_trl declares for ``package``, e.g. ``"trl>=1.9,<1.17"``."""
    requirement = _requirements().get(package)
    return _format(requirement) if requirement else package


def _format(requirement: Requirement) -> str:
    """``trl>=1.9,<1.17``: lower bounds first (packaging sorts them alphabetically, ``trl<1.17,>=1.9``)."""
    specifiers = sorted(requirement.specifier, key=lambda spec: (not spec.operator.startswith(">"), str(spec)))
    return requirement.name + ",".join(str(spec) for spec in specifiers)


def version_problems() -> list[str]:
    """One line per installed package of CHECKED_PACKAGES whose version is outside fipo_trl's supported range."""
    requirements, problems = _requirements(), []
    for package in CHECKED_PACKAGES:
        requirement = requirements.get(package)
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed: its own import error says so
        try:
            supported = requirement is None or requirement.specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            supported = True  # a local build with a non-PEP 440 version: nothing to compare
        if not supported:
            problems.append(f"{package} {installed} is installed; fipo_trl supports {_format(requirement)}")
    return problems


def check_installed_versions() -> None:
    """Raise one ImportError naming every package outside its supported range, and the command that fixes it.
    Run when fipo_trl.config is imported: before any model loads."""
    problems = version_problems()
    if problems:
        requirements = _requirements()
        wanted = " ".join(f"'{_format(requirements[line.split()[0]])}'" for line in problems)
        raise ImportError(
            "fipo_trl cannot run with the installed versions: " + "; ".join(problems) + ". Fix: pip install "
            f"{wanted} (docs/compatibility.md lists the tested combinations).")


def trl_version() -> str:
    return importlib.metadata.version("trl")


def trl_older_than(version: str) -> bool:
    """Whether the installed TRL predates ``version``: for the TRL behaviours FIPO must refuse on older releases."""
    return Version(trl_version()) < Version(version)
