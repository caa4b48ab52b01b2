"""synthetic: learnable random images made in memory, for tests and benchmarks; no files.

Each class is one smooth random pattern (a coarse grid upsampled) in 48..207; each image adds
Gaussian noise to its class's pattern. Everything comes from ``SYNTHETIC_SEED``, never from the run
seed, so every run sees the same images.
"""

from __future__ import annotations

import torch

from prune_cli.core.options import Int
from prune_cli.core.seeds import SYNTHETIC_SEED
from prune_cli.data.spec import DATASETS, DatasetSpec, Raw, channel_stats, dataset_options


@DATASETS.register("synthetic")
class Synthetic(DatasetSpec):
    """In-memory images; size, classes and channels are options, so describe() reads them."""

    options = dataset_options(
        Int("channels", 3, "image channels", lo=1),
        Int("image_size", 32, "images are image_size x image_size", lo=1),
        Int("num_classes", 10, "number of classes (>= 2), balanced", lo=2),
        Int("train_size", 512, "train images", lo=1),
        Int("test_size", 256, "test images", lo=1),
        pad=0,
        flip=False,
        docs={
            "root": "unused by synthetic (kept so every dataset has the same keys)",
            "download": "unused by synthetic",
        },
    )

    @classmethod
    def describe(cls, cfg: dict) -> tuple[tuple[int, int, int], int]:
        return (cfg["channels"], cfg["image_size"], cfg["image_size"]), cfg["num_classes"]

    @classmethod
    def read(cls, cfg: dict) -> Raw:
        c, s, k = cfg["channels"], cfg["image_size"], cfg["num_classes"]

        g = torch.Generator().manual_seed(SYNTHETIC_SEED)
        coarse = torch.rand(k, c, max(2, s // 8), max(2, s // 8), generator=g)
        patterns = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
        patterns = 48.0 + 160.0 * patterns

        def make(n: int, stream: int):
            gen = torch.Generator().manual_seed(SYNTHETIC_SEED + stream)
            y = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]  # balanced classes, shuffled
            noise = torch.randn(n, c, s, s, generator=gen) * 32.0
            x = (patterns[y] + noise).round_().clamp_(0, 255).to(torch.uint8)
            return x, y.long()

        x_tr, y_tr = make(cfg["train_size"], 1)
        x_te, y_te = make(cfg["test_size"], 2)
        mean, std = channel_stats(x_tr)
        return Raw(x_tr, y_tr, x_te, y_te, k, mean, std)
