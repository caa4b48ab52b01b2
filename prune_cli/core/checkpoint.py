"""The checkpoint file format: its schema version, the one reader of every schema (tensors only, never code),
and the digest that names a network's weights."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from prune_cli.core.errors import UserError

# 1: the first format (no "schema" key); 2: adds "schema". Both load the same way.
CHECKPOINT_SCHEMA = 2


def load_checkpoint(path: Path | str, mapped: bool = False) -> dict:
    """A prune_cli checkpoint of any schema this version reads (CPU tensors). ``mapped``: its tensors memory-mapped,
    not read, for a caller that wants its tables or config alone (a legacy, non-zip file is read whole)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except RuntimeError:
        if not mapped:
            raise
        ck = torch.load(path, map_location="cpu", weights_only=True)
    schema = ck.get("schema", 1)
    if schema > CHECKPOINT_SCHEMA:
        raise UserError(
            "init_from",
            f"{path} was written by a newer prune_cli (checkpoint schema {schema}); upgrade prune_cli to read it",
        )
    return ck


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of a state_dict's names and tensor bytes: equal for equal weights, whatever file holds them."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
