"""A dataset's identity: a hash of its decoded arrays (uint8 images and labels of both splits), taken once when
the data are read, so a run resumed against changed files is recognised (``run/rundir.py`` compares it with the one
its checkpoints record)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from prune_cli.data.stream import StreamedImages

CHUNK_BYTES = 2**26  # hashed a slice at a time: no copy of a large split


def fingerprint(*arrays: torch.Tensor | StreamedImages) -> str:
    """A short hex digest of ``arrays`` in order: each one's dtype, shape and bytes (a streamed split: its files'
    class folder, name and size, as decoding every image would cost an epoch)."""
    digest = hashlib.blake2b(digest_size=12)
    for array in arrays:
        if isinstance(array, StreamedImages):
            _update_files(digest, array)
        else:
            _update_tensor(digest, array)
    return digest.hexdigest()


def _update_tensor(digest, tensor: torch.Tensor) -> None:
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    digest.update(f"{array.dtype}{array.shape}".encode())
    flat = array.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, CHUNK_BYTES):
        digest.update(memoryview(flat[start : start + CHUNK_BYTES]))


def _update_files(digest, images: StreamedImages) -> None:
    digest.update(f"files{images.shape}".encode())
    for path in images.paths:
        folder, name = os.path.split(path)
        try:
            size = os.path.getsize(path)
        except OSError:  # gone since it was listed: decoding it will say so, naming the file
            size = -1
        digest.update(f"{os.path.basename(folder)}/{name}:{size};".encode())
