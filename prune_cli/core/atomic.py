"""Atomic writes: a temporary file in the same directory, then a rename, so a crash never leaves half a file.
In a distributed run only rank 0 writes (the other ranks compute the same files).

The file gets the mode any other tool's output gets (0666 less the process umask), not mkstemp's 0600.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from prune_cli.core import distributed


def _replace(path: Path, write) -> None:
    if not distributed.is_main():  # in a distributed run rank 0 alone writes the run's files
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_text(path: Path | str, text: str) -> None:
    _replace(Path(path), lambda f: f.write(text.encode()))


def save_torch(path: Path | str, obj) -> None:
    _replace(Path(path), lambda f: torch.save(obj, f))
