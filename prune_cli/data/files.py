"""Helpers the readers of on-disk datasets share: the data folder and one-line error texts.

Errors about files name ``dataset.root`` (or ``dataset.download`` for a failed download), say where
we looked, and say how to fix it, on one line.
"""

from __future__ import annotations

import os

from ..errors import UserError


def data_root(cfg: dict) -> str:
    """``dataset.root`` as an absolute path: relative to where the user started the command."""
    root = cfg.get("root")
    if root is None or str(root).strip() == "":
        raise UserError(
            "dataset.root",
            "is empty; give the folder that holds the datasets (or set the PRUNE_CLI_DATA environment variable)",
        )
    root = os.path.expanduser(str(root))
    try:  # Hydra knows the start folder also when the run has changed into its run dir
        from hydra.utils import to_absolute_path

        return to_absolute_path(root)
    except Exception:  # pragma: no cover - hydra missing or unusual state
        return os.path.abspath(root)


def brief(err: BaseException) -> str:
    """``Type: first line ... last line`` of the message, for one-line error messages."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(err).__name__}: {text[:300]}"


def download_error(what: str, root: str, err: BaseException, how: str) -> UserError:
    """The UserError for a failed download of ``what``; ``how`` says how to get the files by hand."""
    return UserError(
        "dataset.download",
        f"could not download {what} into {root} ({brief(err)}); {how}, then run with dataset.download=false",
    )
