"""The public names in the README's API table are exported flat, and nothing else sneaks into __all__."""

from __future__ import annotations

import pyro.infer

import pyro_elbo


def _readme_api_names() -> set[str]:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## API") :].split("\n\n")[1]
    names: set[str] = set()
    for line in table.splitlines()[2:]:
        names.update(part.strip().strip("`") for part in line.split("|")[1].split(","))
    return names


def test_readme_api_table_is_the_public_api() -> None:
    assert _readme_api_names() == set(pyro_elbo.__all__)
    for name in pyro_elbo.__all__:
        assert getattr(pyro_elbo, name) is not None, name
    assert pyro_elbo.__all__ == sorted(pyro_elbo.__all__)


def test_objectives_are_pyro_elbos() -> None:
    for name in ("ELBO", "IWAE", "DReG", "STL", "RenyiELBO", "CUBO", "VIMCO"):
        assert issubclass(getattr(pyro_elbo, name), pyro.infer.ELBO), name


def test_console_script_is_declared() -> None:
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[1] / "setup.cfg").read_text()
    assert "pyro-elbo = pyro_elbo.cli:main" in setup


def test_ci_runs_exactly_the_readme_test_command() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command.startswith("python -m pip install torch==2.13.0")
    assert command in (root / "README.md").read_text()
