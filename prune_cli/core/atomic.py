"""Atomic writes: a temporary file in the same directory, then a rename, so a crash never leaves half a file.
In a distributed run only rank 0 writes (the other ranks compute the same files).

The file gets the mode any other tool's output gets (0666 less the process umask), not mkstemp's 0600.
A failed write removes its temporary file; a full disk is one line, ``error: <path>: no space left on device``
(``UserError``, exit 2). A killed process cannot clean up: its temporary files (named ``.<file>.<random>`` +
``TEMP_SUFFIX``) are removed by the next run's start (``remove_stale``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from pathlib import Path

import torch

from prune_cli.core import distributed
from prune_cli.core.errors import UserError

TEMP_SUFFIX = ".prune-cli-tmp"  # recognisable: only files named so are ever removed as stale
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 64 * 1024  # bytes: less free space than this is a full disk (no run file fits)
STARTED = time.time()  # this process's start, near enough: a temporary file older than it is no write of ours


def disk_full(path: Path | str) -> UserError:
    """The one error a full disk gives, naming the file that did not fit."""
    return UserError(str(path), "no space left on device")


def is_disk_full(error: BaseException, directory: Path | str) -> bool:
    """Whether ``error`` is a write that failed for lack of space in ``directory``: ENOSPC / EDQUOT, or torch's
    zip writer's RuntimeError (it reports a short write, not the errno) while the disk has no room left."""
    if isinstance(error, OSError):
        return error.errno in FULL_ERRNOS
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return "No space left" in text or ("unexpected pos" in text and free_bytes(directory) < LOW_SPACE)


def free_bytes(directory: Path | str) -> int:
    """Bytes an unprivileged write may still use in ``directory`` (a huge number when unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def temp_file(path: Path) -> tuple[int, str]:
    """(descriptor, name) of a new temporary file beside ``path``."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)


def _replace(path: Path, write) -> None:
    if not distributed.is_main():  # in a distributed run rank 0 alone writes the run's files
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = temp_file(path)
    except OSError as e:
        if e.errno in FULL_ERRNOS:
            raise disk_full(path) from None
        raise
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        full = is_disk_full(e, path.parent)  # judged before the temporary file frees its space
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if full:
            raise disk_full(path) from None
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_text(path: Path | str, text: str) -> None:
    _replace(Path(path), lambda f: f.write(text.encode()))


def write_bytes(path: Path | str, data: bytes) -> None:
    _replace(Path(path), lambda f: f.write(data))


def save_torch(path: Path | str, obj) -> None:
    _replace(Path(path), lambda f: torch.save(obj, f))


def remove_stale(directory: Path | str, started: float = STARTED) -> list[Path]:
    """Remove the temporary files of writes killed before ``started`` (default: this process's start) in
    ``directory``; returns them. Newer ones may belong to a write in progress and stay."""
    removed = []
    for p in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if p.is_file() and p.stat().st_mtime < started:
                p.unlink()
                removed.append(p)
    return removed
