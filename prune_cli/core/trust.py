"""Which code a file may make this process run: only the factory targets the user named.

A checkpoint is data. The ``package.module:factory`` target its ``arch`` names (``model=custom``) is imported and
called only while the user's own naming of it is in force: ``model.target`` on this command line (the pipeline
trusts its config's target for the run), ``prune-cli-export --trust TARGET`` or ``prune_cli.load(path,
trust=[TARGET])``. Everything else a file names is refused in one line saying how to allow it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

_trusted: set[str] = set()


@contextlib.contextmanager
def trusting(targets: Iterable[str]) -> Iterator[None]:
    """Allow the factory ``targets`` to be imported and called while the block runs."""
    added = {str(t) for t in targets if t} - _trusted
    _trusted.update(added)
    try:
        yield
    finally:
        _trusted.difference_update(added)


def trusted(target: str) -> bool:
    return target in _trusted


def how_to_allow(target: str) -> str:
    """The one line that names a refused target and the three ways to allow it."""
    return (
        f"the checkpoint names the factory {target}, and a file never runs code unless asked; allow it with "
        f"model.target={target} on the command line, prune-cli-export --trust {target}, or "
        f"prune_cli.load(path, trust=[{target!r}])"
    )
