"""A run directory's owner: an OS lock on ``run.lock``, released when the process ends (a dead run's lock is
never in the way)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

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
    """Own ``run_dir`` until this process ends (a second call in the same process is a no-op)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held_locks:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError("hydra.run.dir", f"cannot write {run_dir} ({e.strerror or type(e).__name__})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError("hydra.run.dir", f"{run_dir} is in use by another run ({lock_owner(run_dir)})") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
    _held_locks[run_dir] = fd


def owns(run_dir: Path) -> bool:
    """Whether this process holds ``run_dir``'s lock (only then may it write the directory's status)."""
    return Path(run_dir).resolve() in _held_locks


def release(run_dir: Path) -> None:
    fd = _held_locks.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock
