"""The layer rule of ARCHITECTURE.md section 1, checked from the source.

Every package's imports (top-level and lazy ones inside functions, in src/ and tests/) and its
pyproject dependencies may point only down the stack:

    kernels <- comm <- core <- {train, eval, serve} <- rl

An import of another nmoe package must also be declared in the importer's pyproject.toml.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())

# Which nmoe packages each package may depend on (downward edges only).
ALLOWED: dict[str, set[str]] = {
    "nmoe-kernels": set(),
    "nmoe-comm": {"nmoe-kernels"},
    "nmoe-core": {"nmoe-kernels", "nmoe-comm"},
    "nmoe-train": {"nmoe-kernels", "nmoe-comm", "nmoe-core"},
    "nmoe-eval": {"nmoe-kernels", "nmoe-comm", "nmoe-core"},
    "nmoe-serve": {"nmoe-kernels", "nmoe-comm", "nmoe-core"},
    "nmoe-rl": {"nmoe-kernels", "nmoe-comm", "nmoe-core", "nmoe-train", "nmoe-eval", "nmoe-serve"},
}


def _dist_of_module(module: str) -> str | None:
    top = module.split(".")[0]
    if top.startswith("nmoe_"):
        return "nmoe-" + top[len("nmoe_"):]
    return None


def imported_nmoe_packages(package_dir: Path) -> dict[str, set[str]]:
    """nmoe distribution -> files importing it, over src/ and tests/ of one package."""
    found: dict[str, set[str]] = {}
    for folder in ("src", "tests", "bench"):
        for path in (package_dir / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in (
                    "import_module",
                ) and node.args and isinstance(node.args[0], ast.Constant):
                    names = [str(node.args[0].value)]
                for name in names:
                    dist = _dist_of_module(name)
                    if dist:
                        found.setdefault(dist, set()).add(str(path.relative_to(package_dir)))
    return found


def declared_nmoe_dependencies(package_dir: Path) -> set[str]:
    project = tomllib.loads((package_dir / "pyproject.toml").read_text())["project"]
    deps = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    names = {re.split(r"[ <>=!~;\[]", dep.strip(), maxsplit=1)[0].lower() for dep in deps}
    return {n.replace("_", "-") for n in names if n.startswith("nmoe")}


def test_known_packages_only():
    unknown = set(PACKAGES) - set(ALLOWED)
    assert not unknown, f"packages without a layer in ALLOWED: {unknown}"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down_and_are_declared(package):
    package_dir = ROOT / "packages" / package
    imports = imported_nmoe_packages(package_dir)
    imports.pop(package, None)
    declared = declared_nmoe_dependencies(package_dir)
    bad_edges = {dist: sorted(files) for dist, files in imports.items()
                 if dist not in ALLOWED[package]}
    assert not bad_edges, f"{package} imports packages above or beside it: {bad_edges}"
    undeclared = {dist: sorted(files) for dist, files in imports.items() if dist not in declared}
    assert not undeclared, f"{package} imports nmoe packages it does not declare: {undeclared}"
    bad_declared = declared - ALLOWED[package]
    assert not bad_declared, f"{package} declares dependencies above or beside it: {bad_declared}"


def test_checker_catches_an_upward_import(tmp_path):
    (tmp_path / "src" / "nmoe_kernels").mkdir(parents=True)
    (tmp_path / "src" / "nmoe_kernels" / "x.py").write_text(
        "def f():\n    from nmoe_core.model import Transformer\n    return Transformer\n"
    )
    found = imported_nmoe_packages(tmp_path)
    assert "nmoe-core" in found and "nmoe-core" not in ALLOWED["nmoe-kernels"]
