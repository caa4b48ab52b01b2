"""scikit-learn's digits: 1,797 grayscale 8x8 images in 10 classes, shipped with scikit-learn.

No files and no download. Pixels 0..16 are scaled to 0..255; a fixed stratified 80/20 split
(the same for every run seed) gives 1,438 train / 359 test images.
"""

from __future__ import annotations

import numpy as np
import torch

from prune_cli.core.seeds import DIGITS_SPLIT_SEED, numpy_rng
from prune_cli.data.spec import (
    DATASETS,
    DatasetSpec,
    Raw,
    channel_stats,
    dataset_options,
    stratified_indices,
)

TEST_SHARE = 0.2


@DATASETS.register("digits")
class Digits(DatasetSpec):
    """scikit-learn's digits with its fixed split; statistics of the train split."""

    options = dataset_options(
        pad=1,
        flip=False,
        docs={
            "root": "unused by digits (kept so every dataset has the same keys)",
            "download": "unused by digits (the data ships with scikit-learn)",
            "flip": "random horizontal flip of training images (off: digits are not mirror-symmetric)",
        },
    )
    shape, num_classes = (1, 8, 8), 10

    @classmethod
    def read(cls, cfg: dict) -> Raw:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)).unsqueeze(1)
        y = torch.from_numpy(bunch.target.astype(np.int64))
        # stream 0 of the split's own seed: seeds.py's numbered streams are the per-run ones
        test_idx = stratified_indices(y, int(round(TEST_SHARE * len(y))), numpy_rng(DIGITS_SPLIT_SEED, 0))
        is_test = torch.zeros(len(y), dtype=torch.bool)
        is_test[test_idx] = True
        x_tr, y_tr = x[~is_test].contiguous(), y[~is_test]
        mean, std = channel_stats(x_tr)  # no published statistics: those of the train split
        return Raw(x_tr, y_tr, x[is_test].contiguous(), y[is_test], cls.num_classes, mean, std)
