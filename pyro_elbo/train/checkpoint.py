"""Checkpoint files: atomic writes, a format tag, and reading every format ``fit`` ever wrote.

A checkpoint is the ``dict`` of :meth:`~pyro_elbo.train.TrainState.state_dict`, saved with
``torch.save`` and read with ``weights_only=True`` (no code is unpickled).

Formats:
    ``pyro_elbo.checkpoint/2`` (written now): format 1 plus ``settings``, the learning rate and the
    optimizer, scheduler and objective a resume must match, and (in files written since they were
    added; a file without them is not checked for them) ``compile`` and ``constraints``, each
    ``pyro.param``'s constraint by name.
    ``pyro_elbo.checkpoint/1`` (written before ``pyro_elbo.train`` became a package): read, with the
    settings that format does not record taken from its optimizer state.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "pyro_elbo.checkpoint/2"
FORMAT_1 = "pyro_elbo.checkpoint/1"
READABLE_FORMATS = (FORMAT_1, CHECKPOINT_FORMAT)

#: fields every readable format has, and what each must hold inside (for a clear message)
FIELDS_1: dict[str, tuple[str, ...]] = {
    "objective": (),
    "objective_state": (),
    "param_names": (),
    "params": (),
    "optimizer": ("state", "param_groups"),
    "scheduler": (),
    "step": (),
    "epoch": (),
    "batch_in_epoch": (),
    "epoch_rng": (),
    "history": (),
    "step_seconds": (),
    "num_skipped": (),
    "validation_history": (),
    "rng": ("torch", "cuda", "python", "numpy"),
    "world_size": (),
    "rank_rng": (),
}
FIELDS_2: dict[str, tuple[str, ...]] = {**FIELDS_1, "settings": ("lr", "optimizer", "scheduler", "objective")}


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a temporary file in the same folder, flushed to disk, then
    renamed over ``path``. A crash (even ``kill -9``) mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def stray_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """The temporary files of writes to ``path`` that never finished (``.NAME.XXXX.tmp``: the
    process was killed between creating and renaming it)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))


def remove_stray_temporaries(path: str | os.PathLike[str]) -> None:
    """Remove :func:`stray_temporaries` (call it only while no other process writes ``path``)."""
    for tmp in stray_temporaries(path):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`~pyro_elbo.fit` (``weights_only``: no code is unpickled).

    Format 1 files (written before the current format) are read and returned with the fields of
    the current format added (``settings`` from their optimizer state, ``lr`` included).

    Raises:
        ValueError: the file is corrupt, truncated, not a pyro_elbo checkpoint, written by a newer
            version of pyro_elbo, or lacks fields (each one named).
    """
    try:
        state = torch.load(
            Path(path), map_location=map_location if map_location is not None else "cpu", weights_only=True
        )
    except Exception as error:
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupt or unreadable ({type(error).__name__}: {error})"
        ) from error
    tag = state.get("format") if isinstance(state, dict) else None
    if not isinstance(tag, str) or not tag.startswith("pyro_elbo.checkpoint/"):
        raise ValueError(f"{str(path)!r} is not a pyro_elbo checkpoint")
    if tag not in READABLE_FORMATS:
        newer = re.fullmatch(r"pyro_elbo\.checkpoint/(\d+)", tag) is not None
        raise ValueError(
            f"{str(path)!r} has format {tag!r}, which this version of pyro_elbo cannot read (it reads "
            f"{', '.join(READABLE_FORMATS)})"
            + ("; it was written by a newer pyro_elbo: upgrade to resume it" if newer else "")
        )
    missing = missing_fields(state, FIELDS_1 if tag == FORMAT_1 else FIELDS_2)
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} has the format tag {tag!r} but lacks the field(s) {missing}; it was "
            "not written by fit (or was edited). Nothing was loaded."
        )
    return upgrade(state) if tag == FORMAT_1 else state


def missing_fields(state: dict[str, Any], fields: dict[str, tuple[str, ...]]) -> list[str]:
    """The names (``"optimizer.param_groups"`` for a nested one) of the fields ``state`` lacks."""
    missing = []
    for name, inner in fields.items():
        if name not in state:
            missing.append(name)
            continue
        if inner and not isinstance(state[name], dict):
            missing += [f"{name}.{key}" for key in inner]
        elif inner:
            missing += [f"{name}.{key}" for key in inner if key not in state[name]]
    return missing


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A format 1 checkpoint as format 2. Format 1 did not record the optimizer or scheduler class
    (``None``: the check of the optimizer's options covers them) but its learning rate is the first
    parameter group's ``initial_lr`` (set by a scheduler) or ``lr``."""
    group = state["optimizer"]["param_groups"][0] if state["optimizer"]["param_groups"] else {}
    settings = {
        "lr": group.get("initial_lr", group.get("lr")),
        "optimizer": None,
        "scheduler": None,
        "objective": state["objective"],
    }
    return {**state, "format": CHECKPOINT_FORMAT, "settings": settings, "upgraded_from": FORMAT_1}


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail now, not after the run, if ``path`` cannot be written: create its folder if needed and
    a temporary file in it (removed again). The checkpoint file itself is not touched.

    Raises:
        ValueError: naming the path and why (a folder where the file should be, a file where a
            folder should be, no permission, a read-only file system).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"checkpoint={str(path)!r} is a folder; pass the path of a file in it (e.g. {str(path / 'checkpoint.pt')!r})"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as error:
        raise ValueError(
            f"checkpoint={str(path)!r} cannot be written ({type(error).__name__}: {error}); checked before the "
            "first step so that no training is lost. Pass a writable path."
        ) from error
