"""Batch throughput of a streamed imagefolder against the same folder decoded into memory.

Writes a folder of random ``--size`` x ``--size`` PNGs (``--images`` train images in 10 classes, a tenth as
many test images) into a temporary directory, loads it with ``dataset.stream=never`` and ``=always``, and times
epochs of ``prune_cli.data.batches`` (seeded order, pad 4 + flip augmentation) over the train split, the two
loops interleaved (a busy machine slows both alike): images/s of each, best of ``--repeats``, the in-memory
decode time (paid once per run), and ``ratio`` = streamed / in memory. The batches are only produced, not
trained on: this is the data loop's own cost, which a training step hides only where it is small against it.
Then the streamed loop as rank 0 of ``--world`` processes under torchrun sees it (``container.shards``, the
process's rank and world set in this one process): the images it decodes an epoch and its epoch time, against
those of the whole batches one process decodes (``rank/whole``).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prune_cli.core import distributed
from prune_cli.data import batches, load_data
from prune_cli.data.container import shards


def write_folder(root: Path, n_train: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", max(10, n_train // 10))):
        for i in range(n):
            folder = root / split / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def epoch_seconds(data, batch: int, seed: int) -> float:
    start = time.perf_counter()
    for _ in batches(data.train, data, batch, generator=torch.Generator().manual_seed(seed), train=True):
        pass
    return time.perf_counter() - start


@contextlib.contextmanager
def as_rank(rank: int, world: int):
    """This process as rank ``rank`` of ``world`` for the batching (no process group: nothing is exchanged)."""
    saved = distributed.rank, distributed.world
    distributed.rank, distributed.world = (lambda: rank), (lambda: world)
    try:
        yield
    finally:
        distributed.rank, distributed.world = saved


def shard_epoch(data, batch: int, seed: int, world: int) -> tuple[float, int]:
    """Seconds of an epoch of rank 0's shards of ``world`` and the images they hold (the files it decodes)."""
    images, start = 0, time.perf_counter()
    with as_rank(0, world):
        for _, y, _, _ in shards(data.train, data, batch, generator=torch.Generator().manual_seed(seed), train=True):
            images += len(y)
    return time.perf_counter() - start, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="train images")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (written and read at this size)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="dataset.workers of the streamed loop")
    ap.add_argument("--repeats", type=int, default=5, help="epochs timed per loop (the best counts)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (augmentation) in the main process")
    ap.add_argument("--world", type=int, default=2, help="torchrun processes whose rank 0 is timed (1: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), args.images, args.size)
        cfg = {
            "name": "imagefolder",
            "root": tmp,
            "image_size": args.size,
            "pad": 4,
            "flip": True,
            "workers": args.workers,
        }
        start = time.perf_counter()
        memory = load_data({**cfg, "stream": "never"}, seed=0, device="cpu")
        decode = time.perf_counter() - start
        streamed = load_data({**cfg, "stream": "always"}, seed=0, device="cpu")
        seconds = [[epoch_seconds(d, args.batch, seed) for d in (memory, streamed)] for seed in range(args.repeats)]
        in_memory, from_files = (len(memory.train) / min(column) for column in zip(*seconds))
        if args.world > 1:
            runs = [
                [shard_epoch(streamed, args.batch, seed, w) for w in (1, args.world)] for seed in range(args.repeats)
            ]
            (whole, n_whole), (part, n_part) = (min(column) for column in zip(*runs))
    shape = f"3x{args.size}x{args.size}"
    print(f"{args.images} train images {shape}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    print(f"in memory: {in_memory:9.0f} images/s (after decoding them all once in {decode:.2f} s)")
    print(f"streamed:  {from_files:9.0f} images/s ({args.workers} workers)")
    print(f"ratio = {from_files / in_memory:.3f}")
    if args.world > 1:
        print(f"rank 0 of {args.world}: decodes {n_part} of {n_whole} images an epoch, in {part:.3f} s of {whole:.3f}")
        print(f"rank/whole: images {n_part / n_whole:.3f}, time {part / whole:.3f}")


if __name__ == "__main__":
    main()
