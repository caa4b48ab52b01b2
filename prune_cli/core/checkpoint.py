"""The checkpoint file format: its schema version and the one reader of every schema (tensors only, never code)."""

from __future__ import annotations

from pathlib import Path

import torch

from prune_cli.core.errors import UserError

# 1: the first format (no "schema" key); 2: adds "schema". Both load the same way.
CHECKPOINT_SCHEMA = 2


def load_checkpoint(path: Path | str) -> dict:
    """A prune_cli checkpoint of any schema this version reads (CPU tensors)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    schema = ck.get("schema", 1)
    if schema > CHECKPOINT_SCHEMA:
        raise UserError(
            "init_from",
            f"{path} was written by a newer prune_cli (checkpoint schema {schema}); upgrade prune_cli to read it",
        )
    return ck
