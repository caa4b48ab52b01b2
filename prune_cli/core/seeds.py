"""Every random stream of a run, derived from the run's ``seed`` in one place.

The derivations stay distinct functions on purpose: each one fixes a stream that published tables
and resumed runs depend on (model init, data order, subsets, samples), so none may change.
"""

from __future__ import annotations

import numpy as np
import torch

SYNTHETIC_SEED = 20240607  # synthetic images never depend on the run seed
DIGITS_SPLIT_SEED = 0  # the digits train/test split is fixed forever
TEST_SUBSET_SEED = 0  # test_subset picks the same images for every run seed
NETWORK_STRIDE = 100_003  # grafting: network k draws its data order from seed + k * NETWORK_STRIDE

# numpy streams of the data pipeline
SUBSET_STREAM, TEST_SUBSET_STREAM, VAL_STREAM = 1, 2, 3


def derived(seed: int, salt: str) -> int:
    """A torch seed for one purpose of a run: ``init``, ``scratch``, ``sample``, or a stage name (grafting)."""
    return seed * 7919 + sum(map(ord, salt))


def epoch_generator(device, seed: int, stage: str, epoch: int) -> torch.Generator:
    """Data order and augmentation of one epoch depend only on (seed, stage, epoch): resumed runs repeat them."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + sum(map(ord, stage)) * 1009 + epoch)
    return g


def numpy_rng(seed: int, stream: int) -> np.random.Generator:
    """The data pipeline's numpy streams (subsets, validation split), one per ``stream`` number."""
    return np.random.default_rng([int(seed) % 2**63, stream])
