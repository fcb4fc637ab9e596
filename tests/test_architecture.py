"""The layering that docs/architecture.md promises, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_elbo"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_pyro_layer_uses_effect_handlers() -> None:
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "_pyro" not in path.relative_to(PACKAGE).parts
        and any(name == "pyro.poutine" or name.startswith("pyro.poutine.") for name in _imports(path))
    ]
    assert offenders == [], f"only pyro_elbo/_pyro/ may import pyro.poutine; found it in {offenders}"


def test_estimators_import_no_pyro() -> None:
    imports = _imports(PACKAGE / "estimators.py")
    assert not any(name == "pyro" or name.startswith("pyro.") for name in imports)


def test_the_pyro_layer_does_not_reach_up() -> None:
    """``_pyro`` is the bottom layer: it imports nothing of the package but itself, types and RNG."""
    allowed = ("pyro_elbo._pyro", "pyro_elbo._typing", "pyro_elbo._random")
    for path in (PACKAGE / "_pyro").rglob("*.py"):
        for name in _imports(path):
            if name.startswith("pyro_elbo"):
                assert name.startswith(allowed), f"{path.name} imports {name}"
