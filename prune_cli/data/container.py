"""The loaded dataset on the device, and its batching: containers, normalisation and augmentation.

Every dataset ends up as ``uint8 [N, C, H, W]`` images and ``int64 [N]`` labels on the training
device, and is then only indexed: no DataLoader, no workers, no per-sample Python. The one exception
is an imagefolder too large for memory: its images stay files (``stream.StreamedImages``) decoded batch
by batch, in the same batches. Random crop (zero padding) and horizontal flip run on whole batches with
advanced indexing, on the device, after the batch is there: so both kinds draw the same random numbers.
Under torchrun each process reads and augments only its part (``shards``: its shard of every training batch;
``batches(mine=True)``: its evaluation batches), with the draws of the whole batch: the numbers of one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from prune_cli.core import distributed
from prune_cli.data.stream import StreamedImages


@dataclass
class Split:
    x: torch.Tensor | StreamedImages  # uint8 [N, C, H, W] on the device, or files decoded onto it when read
    y: torch.Tensor  # int64 [N] on the device

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``idx`` on the device."""
        return self.x[idx].decode() if isinstance(self.x, StreamedImages) else self.x[idx]

    def uint8_ranges(
        self, order: torch.Tensor | None, ranges: list[tuple[int, int]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(uint8 x, y)`` on the device for each ``(start, stop)`` range of ``order`` (an index tensor; None:
        0..N-1), in turn: only the images in the ranges are read (a streamed split decodes only those files)."""
        if isinstance(self.x, StreamedImages):
            every = torch.arange(len(self), device=self.y.device) if order is None else order
            index_batches = [every[start:stop] for start, stop in ranges]
            for idx, xb in zip(index_batches, self.x.batches([i.tolist() for i in index_batches])):
                yield xb, self.y[idx]
            return
        for start, stop in ranges:
            if order is None:
                yield self.x[start:stop], self.y[start:stop]
            else:
                idx = order[start:stop]
                yield self.x[idx], self.y[idx]

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, x={tuple(self.x.shape)} {self.x.dtype} on {self.x.device})"


@dataclass
class Data:
    name: str
    train: Split
    test: Split
    val: Split | None
    num_classes: int
    mean: torch.Tensor  # float32 [C] on the device, 0..1 pixel units
    std: torch.Tensor
    pad: int
    flip: bool
    fingerprint: str = ""  # the hash of the decoded arrays as read (``fingerprint.fingerprint``): the data's identity
    source: str | None = None  # the folder read when it is not dataset.root (a reader's documented fallback)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)


def normalize(x: torch.Tensor, data: Data) -> torch.Tensor:
    """uint8 batch [B, C, H, W] -> float32 ``(x / 255 - mean) / std`` per channel."""
    mean = data.mean.to(x.device)[None, :, None, None]
    std = data.std.to(x.device)[None, :, None, None]
    return (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Per-sample random crop of the zero-padded image and per-sample horizontal flip.

    ``x`` is uint8 ``[B, C, H, W]``; the result has the same shape and dtype and stays on
    ``x.device``. Sample b is shifted by ``(dy_b - pad, dx_b - pad)`` with ``dy, dx`` uniform in
    ``0..2*pad`` (positions outside the image become 0) and then mirrored if ``flip_b``.
    Random numbers come from ``generator`` (None: torch's global RNG) in the order dy, dx, flip.
    """
    if x.ndim != 4:
        raise ValueError(f"augment expects [B, C, H, W], got shape {tuple(x.shape)}")
    if not pad and not flip:
        return x
    return shift_and_flip(x, pad, *augment_params(len(x), pad, flip, generator, x.device))


def shift_and_flip(
    x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor, flipped: torch.Tensor
) -> torch.Tensor:
    """``augment`` with its draws given (one per sample of ``x``): each sample on its own, so a slice of a batch
    with the slice of the batch's draws is the slice of the augmented batch."""
    b, c, h, w = x.shape
    if not pad:
        return torch.where(flipped[:, None, None, None], x.flip(-1), x)
    hp, wp = h + 2 * pad, w + 2 * pad
    padded = x.new_zeros(b, c, hp, wp)  # (faster than F.pad for uint8 on CPU)
    padded[:, :, pad : pad + h, pad : pad + w] = x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = ar_h[None, :] + dy[:, None]  # [B, H]
    cols = torch.where(flipped[:, None], (w - 1 - ar_w)[None, :], ar_w[None, :]) + dx[:, None]  # [B, W]
    idx = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, hp * wp).gather(2, idx).view(b, c, h, w)


def augment_params(b: int, pad: int, flip: bool, generator: torch.Generator | None, device: torch.device):
    """(dy, dx, flipped) for a batch of ``b``: the draws ``augment`` makes, in its order."""
    gdev = generator.device if generator is not None else device
    if pad:
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(device)
    else:
        dy = dx = torch.full((b,), 0, dtype=torch.int64, device=device)
    if flip:
        flipped = torch.randint(0, 2, (b,), generator=generator, device=gdev).to(device).bool()
    else:
        flipped = torch.zeros(b, dtype=torch.bool, device=device)
    return dy, dx, flipped


def batches(
    split: Split,
    data: Data,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    train: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
    mine: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(normalised float x, y)`` batches covering the split once (last batch may be short).

    With ``generator`` the order is ``torch.randperm`` drawn from it; ``train=True`` augments
    (when ``data.pad`` or ``data.flip``) with the same generator. ``x`` is laid out in ``memory_format``
    (the uint8 batch is rearranged, then normalised: the cheaper copy). ``mine=True`` (evaluation under torchrun):
    only this process's batches, every world-th from its rank (``distributed.mine``); the others are not read.
    """
    whole = (lambda i, n: (0, n, 1.0) if distributed.mine(i) else None) if mine else (lambda i, n: (0, n, 1.0))
    for x, y, _, _ in _parts(split, data, batch_size, generator, train, memory_format, whole):
        yield x, y


def shards(
    split: Split,
    data: Data,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    train: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, float]]:
    """This process's shard of each batch ``batches`` yields, as ``(x, y, batch, weight)``: ``batch`` is the whole
    batch's size, the shard and ``weight`` are ``distributed.part``'s (all of it, 1.0, in one process).

    Only the shard's images are read and augmented, with the random numbers drawn for the whole batch: the ranks'
    shards put together are ``batches``' batches, and a streamed split decodes on each rank only its own files."""
    return _parts(split, data, batch_size, generator, train, memory_format, lambda i, n: distributed.part(n))


def _parts(split: Split, data: Data, batch_size: int, generator, train: bool, memory_format, pick):
    """``(normalised x, y, batch, weight)`` for the part ``pick(i, batch) -> (start, stop, weight) | None`` of each
    batch ``i`` of ``batch`` images (None: that batch is not read). Augmentation is drawn for every whole batch in
    turn, read or not, so every part sees the draws of the whole run."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(split)
    order = None
    if generator is not None:
        order = torch.randperm(n, generator=generator, device=generator.device).to(split.x.device)
    do_aug = train and (data.pad > 0 or data.flip)
    spans = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    picks = [pick(i, stop - start) for i, (start, stop) in enumerate(spans)]
    read = split.uint8_ranges(order, [(a + p[0], a + p[1]) for (a, _), p in zip(spans, picks) if p is not None])
    for (start, stop), p in zip(spans, picks):
        drawn = augment_params(stop - start, data.pad, data.flip, generator, split.x.device) if do_aug else None
        if p is None:
            continue
        xb, yb = next(read)
        if drawn is not None:
            xb = shift_and_flip(xb, data.pad, *(t[p[0] : p[1]] for t in drawn))
        yield normalize(xb.contiguous(memory_format=memory_format), data), yb, stop - start, p[2]
