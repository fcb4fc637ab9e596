"""One writer per checkpoint path: a lock file ``PATH.lock`` next to the checkpoint.

Two runs writing one checkpoint (a script launched twice) would overwrite each other's files, and
a second ``resume=True`` launch would adopt the live run. While :func:`~pyro_elbo.fit` runs with
``checkpoint=PATH``, its main process holds an exclusive ``flock`` on ``PATH.lock``, a file that
names the owner (``pid`` and host). The kernel releases the lock when the owner exits, however it
exits (``kill -9`` included), so

- a second writer finds the lock held and is refused, naming the owner's pid and host;
- a lock file left by a process that died is taken over with a warning naming that process.

Where the file system does not support ``flock`` (some network file systems), the owner's pid is
checked instead on the same host; a lock file from another host is then refused, with the
command that removes it.

Stray temporary files of interrupted writes (``.PATH.XXXX.tmp``) belong to no live writer once the
lock is held, and are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import warnings
from pathlib import Path

from pyro_elbo.train.checkpoint import check_writable, remove_stray_temporaries


class CheckpointLocked(ValueError):
    """Another live process writes this checkpoint path."""


class CheckpointLock:
    """The exclusive lock on a checkpoint path (a context manager; see the module)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.checkpoint = Path(path)
        self.path = self.checkpoint.with_name(self.checkpoint.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> CheckpointLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, take over a stale one (warning), or refuse a live owner.

        Raises:
            CheckpointLocked: naming the live owner's pid and host and what to do.
            ValueError: the checkpoint's folder cannot be written
                (:func:`~pyro_elbo.train.checkpoint.check_writable`).
        """
        check_writable(self.checkpoint)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            held = _flock(fd)
            owner = os.read(fd, 4096).decode(errors="replace").strip()
            if held is False or (held is None and _alive_elsewhere(owner)):
                raise CheckpointLocked(
                    f"checkpoint={str(self.checkpoint)!r} is being written by another run ({owner or 'owner unknown'}; "
                    f"lock file {str(self.path)!r}). Two runs writing one checkpoint overwrite each other: pass "
                    "another checkpoint path, or stop that run first"
                    + (f" (if it is dead, remove {str(self.path)!r})" if held is None else "")
                    + "."
                )
            if owner and owner != _me():
                warnings.warn(
                    f"the lock on checkpoint={str(self.checkpoint)!r} was left by a process that is no longer "
                    f"running ({owner}); taking it over",
                    RuntimeWarning,
                    stacklevel=4,
                )
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, _me().encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        remove_stray_temporaries(self.checkpoint)

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)  # closing releases the flock
        self.fd = None


def _me() -> str:
    return f"pid {os.getpid()} on host {socket.gethostname()}"


def _flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: the file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _alive_elsewhere(owner: str) -> bool:
    """Without flock: whether the owner named in the file may still run (another host: unknown,
    taken as alive; this host: its pid exists)."""
    parts = owner.split()
    if len(parts) != 5 or parts[0] != "pid" or not parts[1].isdigit():
        return False
    if parts[4] != socket.gethostname():
        return True
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
