"""Images read from their files batch by batch: imagefolder's stand-in for a tensor too large for memory.

``StreamedImages`` takes the place of a ``Split``'s uint8 ``[N, C, H, W]`` tensor. It holds the file paths,
the PIL mode and the size, and is subset, "moved" and made "contiguous" like a tensor without decoding
anything. Its batches come from a standard DataLoader (one file decoded per index, in ``workers``
processes) in exactly the index batches asked for, and are then moved to the device, so
``container.batches`` augments them with the same random draws as in-memory batches. Under torchrun the index
batches asked for are this process's part only (``container.shards``): no process decodes another's images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from prune_cli.core.errors import UserError
from prune_cli.data.files import decode_image, decode_images

CHUNK_BYTES = 2**26  # decoded images held at once by ``chunks``


@dataclass(frozen=True)
class StreamedImages:
    paths: tuple[str, ...]
    mode: str  # PIL mode: "RGB" (3 channels) or "L" (1)
    size: int  # every image is resized to size x size
    fix: str  # what the user should do about a file that cannot be decoded
    workers: int = 0  # DataLoader worker processes (0: decode in this process)
    device: torch.device = torch.device("cpu")  # where decoded batches go
    dtype = torch.uint8  # (not a field: what the decoded batches hold)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.paths), 3 if self.mode == "RGB" else 1, self.size, self.size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: torch.Tensor) -> StreamedImages:
        """The images an index tensor or a bool mask picks, as a tensor would be subset."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        return replace(self, paths=tuple(self.paths[i] for i in idx.tolist()))

    def to(self, device: torch.device | str) -> StreamedImages:
        return replace(self, device=torch.device(device))

    def contiguous(self) -> StreamedImages:
        return self

    def decode(self) -> torch.Tensor:
        """All of them as uint8 ``[N, C, H, W]`` on the device: for a few images (a sample), not for a split."""
        if not self.paths:
            return torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return torch.from_numpy(decode_images(list(self.paths), self.fix, self.mode, self.size)).to(self.device)

    def chunks(self) -> Iterator[np.ndarray]:
        """All of them as uint8 ``[n, C, H, W]`` arrays of at most ``CHUNK_BYTES`` (one image at least), in order."""
        n, c, h, w = self.shape
        step = max(1, CHUNK_BYTES // (c * h * w))
        for start in range(0, n, step):
            yield decode_images(list(self.paths[start : start + step]), self.fix, self.mode, self.size)

    def batches(self, index_batches: list[list[int]]) -> Iterator[torch.Tensor]:
        """uint8 ``[B, C, H, W]`` on the device for each list of indices, in order, decoded by a DataLoader."""
        if not index_batches:  # (a process with no evaluation batch of its own: no workers started for nothing)
            return
        loader = DataLoader(
            _Files(self),
            batch_sampler=index_batches,
            num_workers=self.workers,
            collate_fn=_stack,
            pin_memory=self.device.type == "cuda",
            # every iterator draws its workers' base seed: from this throwaway generator, not from torch's global
            # one, which model initialisation and unseeded augmentation read (streaming must not change results)
            generator=torch.Generator(),
        )
        for x in loader:
            if isinstance(x, str):
                raise UserError("dataset.root", x)
            yield x.to(self.device, non_blocking=True)


class _Files(Dataset):
    """Item i: image i decoded as uint8 ``[H, W, C]``, or the text of the UserError it raised (an exception raised
    in a DataLoader worker reaches the main process only as a traceback)."""

    def __init__(self, images: StreamedImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray | str:
        im = self.images
        try:
            return decode_image(im.paths[i], im.fix, im.mode, im.size)
        except UserError as e:
            return e.why


def _stack(items: list[np.ndarray | str]) -> torch.Tensor | str:
    """The batch as a contiguous uint8 ``[B, C, H, W]`` tensor (the layout of an in-memory batch), or the first
    error text in it."""
    errors = [item for item in items if isinstance(item, str)]
    if errors:
        return errors[0]
    return torch.from_numpy(np.ascontiguousarray(np.stack(items).transpose(0, 3, 1, 2)))
