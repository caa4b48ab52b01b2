"""A run directory's owner: an OS lock on ``run.lock``, released when the process ends (a dead run's lock is
never in the way)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from prune_cli.core.atomic import FULL_ERRNOS, LOW_SPACE, disk_full, free_bytes, remove_stale
from prune_cli.core.errors import UserError

_held_locks: dict[Path, int] = {}  # run directory -> the open, locked run.lock of this process


def lock_owner(run_dir: Path) -> str | None:
    """Who holds the directory's lock ("host pid N"), or None when it is free or held by this process."""
    path = Path(run_dir) / "run.lock"
    if Path(run_dir).resolve() in _held_locks or not path.is_file():
        return None
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = json.loads(f.read().decode() or "{}")
                return f"{who.get('host', '?')} pid {who.get('pid', '?')}"
            except ValueError:
                return "unknown process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def acquire(run_dir: Path) -> None:
    """Own ``run_dir`` until this process ends (a second call in the same process is a no-op), and remove the
    temporary files of writes killed in it (only the owner may: another live run's writes are its own)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held_locks:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o666)  # no O_TRUNC: not ours yet
    except OSError as e:
        raise _cannot_write(run_dir, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError("hydra.run.dir", f"{run_dir} is in use by another run ({lock_owner(run_dir)})") from None
    try:
        if free_bytes(run_dir) < LOW_SPACE:  # the run's files (Hydra's first) would not fit: refuse before any
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
        os.pwrite(fd, owner, 0)  # overwrite, then cut the rest: a failed write leaves no empty record
        os.ftruncate(fd, len(owner))
    except OSError as e:
        os.close(fd)  # closing releases the lock: the directory is free again
        raise _cannot_write(run_dir, e) from None
    _held_locks[run_dir] = fd
    for directory in (run_dir, run_dir / "checkpoints"):
        remove_stale(directory)


def _cannot_write(run_dir: Path, e: OSError) -> UserError:
    """A full disk is ``error: <dir>: no space left on device``; any other failure names the option."""
    if e.errno in FULL_ERRNOS:
        return disk_full(run_dir)
    return UserError("hydra.run.dir", f"cannot write {run_dir} ({e.strerror or type(e).__name__})")


def owns(run_dir: Path) -> bool:
    """Whether this process holds ``run_dir``'s lock (only then may it write the directory's status)."""
    return Path(run_dir).resolve() in _held_locks


def release(run_dir: Path) -> None:
    fd = _held_locks.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock
