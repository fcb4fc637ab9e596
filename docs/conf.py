"""Sphinx configuration of the pyro_elbo documentation site.

Build: ``python -m pip install -e ".[docs]" && python -m sphinx -W --keep-going docs docs/_build/html``.
The API reference lists every name of ``pyro_elbo.__all__`` (written to ``_api_names.rst`` at each
build, so a new public name appears without editing the site); the gallery runs ``examples/``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyro_elbo  # noqa: E402

project = "pyro_elbo"
author = "the pyro_elbo authors"
copyright = "the pyro_elbo authors"
release = version = pyro_elbo.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax copied into the site: math renders without a network
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "*.txt", "_api_names.rst", "generated/*.md"]
templates_path = ["_templates"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# the API reference: autosummary over pyro_elbo.__all__, type hints in the descriptions
autosummary_imported_members = True
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# written at every build from __all__ and included by api.rst, so that a new public name is listed
# (and its page generated) without editing the site
(HERE / "_api_names.rst").write_text(
    ".. currentmodule:: pyro_elbo\n\n.. autosummary::\n   :toctree: generated\n   :nosignatures:\n\n"
    + "".join(f"   {name}\n" for name in pyro_elbo.__all__),
    encoding="utf-8",
)
autosummary_generate = ["_api_names.rst"]

html_theme = "furo"
html_title = "pyro_elbo"
html_static_path: list[str] = []

# plain references (no network at build time: intersphinx inventories are not fetched)
intersphinx_mapping: dict[str, Any] = {}

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"\.py$",
    "reset_argv": "gallery_argv.gallery_argv",  # docs/gallery_argv.py (a name: the config stays picklable)
    "download_all_examples": False,
    "remove_config_comments": True,
    "min_reported_time": 1,
    "write_computation_times": False,  # no top-level page of times (the glob toctree would list it)
    "image_scrapers": ("matplotlib",),
}


# ``model, guide, *args, **kwargs:`` in a Google-style "Args:" list: the stars are literal
_STARRED = re.compile(r"(?<![`\\*\w])(\*{1,2})(args|kwargs)\b(?!`)")


def _escape_starred_args(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    lines[:] = [_STARRED.sub(lambda m: "\\*" * len(m[1]) + m[2], line) for line in lines]


def setup(app: Any) -> None:
    app.connect("autodoc-process-docstring", _escape_starred_args, priority=400)
