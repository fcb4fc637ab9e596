"""The layering that docs/architecture.md promises, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_elbo"
#: the one module that may import torch's private modules
INTERNALS = PACKAGE / "compile" / "torch_internals.py"


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
    allowed = ("pyro_elbo._pyro", "pyro_elbo._typing", "pyro_elbo._random", "pyro_elbo.compile.torch_internals")
    for path in (PACKAGE / "_pyro").rglob("*.py"):
        for name in _imports(path):
            if name.startswith("pyro_elbo"):
                assert name.startswith(allowed), f"{path.name} imports {name}"


#: torch's private modules: only pyro_elbo/compile/torch_internals.py may use them
_PRIVATE_TORCH = (
    "torch._inductor",
    "torch._dynamo",
    "torch._guards",
    "torch._subclasses",
    "torch._prims",
    "torch._functorch",
    "torch.fx.experimental",
    "torch.utils._python_dispatch",
)


def _dotted(node: ast.expr) -> str:
    """``torch._guards.tracing`` for the attribute chain of that name ('' for anything else)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def test_one_module_uses_torchs_private_modules() -> None:
    """Imports of torch's private modules, and attribute chains into them (``torch._guards.x``),
    appear in ``compile/torch_internals.py`` only: a torch release that moves one breaks one module,
    whose callers fall back."""

    def private(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in _PRIVATE_TORCH)

    offenders = set()
    for path in PACKAGE.rglob("*.py"):
        if path == INTERNALS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = {_dotted(node)} if isinstance(node, ast.Attribute) else set()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = _imports_of(node)
            offenders.update(f"{path.relative_to(PACKAGE)}: {name}" for name in names if private(name))
    assert sorted(offenders) == [], "only pyro_elbo/compile/torch_internals.py may use torch's private modules"
    assert any(private(name) for name in _imports(INTERNALS))  # the rule sees imports


def _imports_of(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not node.module:
        return set()
    return {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}


def _layers() -> dict[str, int]:
    """The module table of docs/architecture.md: module -> layer."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    layers = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`") and cells[1].isdigit():
            layers[cells[0].strip("`")] = int(cells[1])
    return layers


def _row(dotted: str, layers: dict[str, int]) -> str:
    """The table's row for a module (``compile.graph``): the longest dotted prefix with a row of
    its own (``compile.torch_internals`` has one; ``compile.graph`` falls under ``compile``)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in layers:
            return ".".join(parts[:end])
    return parts[0]


def test_every_module_is_on_the_map_and_imports_only_downwards() -> None:
    layers = _layers()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        module = _row(".".join(path.relative_to(PACKAGE).with_suffix("").parts), layers)
        assert module in layers, f"pyro_elbo/{path.relative_to(PACKAGE)} is not in docs/architecture.md"
        tree = ast.parse(path.read_text())
        type_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in type_only:  # annotations only: no import at run time
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyro_elbo."):
                target = _row(node.module.removeprefix("pyro_elbo."), layers)
                if target != module:
                    assert layers[target] <= layers[module], (
                        f"{path.relative_to(PACKAGE)} (layer {layers[module]}) imports {node.module} "
                        f"(layer {layers[target]})"
                    )
