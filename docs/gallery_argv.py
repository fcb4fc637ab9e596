"""The command-line arguments each gallery script runs with while the site is built.

Each script's defaults are its full run; these are shorter (fewer steps and particles), so that
the whole gallery builds in a few minutes on two cores. A script not listed runs with its defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BUILD = Path(__file__).resolve().parent / "_build"

GALLERY_ARGV = {
    "quickstart.py": ["2000", "10000"],
    "eight_schools.py": ["1000", "10000"],
    "logistic_regression.py": ["200"],
    "mixture_vimco.py": ["500"],
    "vae_digits.py": ["--steps", "300", "--test-particles", "200"],
    "diffusion_digits.py": (
        "--steps 150 --T 8 --hidden 64 --blocks 1 --iwae-particles 16 --ais-points 2 --ais-steps 10"
        " --ais-chains 2 --gap-particles 50 --png "
    ).split()
    + [str(BUILD / "diffusion_digits_samples.png")],
}


def gallery_argv(gallery_conf: dict[str, Any], script_vars: dict[str, Any]) -> list[str]:
    """sphinx-gallery's ``reset_argv``: the arguments for the script at ``script_vars["src_file"]``."""
    BUILD.mkdir(parents=True, exist_ok=True)  # where diffusion_digits.py writes its samples
    return list(GALLERY_ARGV.get(Path(script_vars["src_file"]).name, []))
