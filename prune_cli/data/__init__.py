"""Datasets as uint8 tensors on the training device, batched by index, augmented on the device.

Each dataset is one ``DatasetSpec`` registered in ``DATASETS`` under its ``dataset.name`` (one module
per family: cifar, tinyimagenet, fashion_mnist, digits, synthetic, imagefolder); ``spec`` holds the shared options
and split rules, ``container`` the loaded tensors and their batching and augmentation.
Bad input raises ``UserError`` naming the option and saying where we looked and how to fix it.
"""

from prune_cli.data.container import Data, Split, augment, batches, normalize
from prune_cli.data.spec import DATASETS, DatasetSpec, Raw, describe, load_data, stratified_indices

__all__ = [
    "DATASETS",
    "Data",
    "DatasetSpec",
    "Raw",
    "Split",
    "augment",
    "batches",
    "describe",
    "load_data",
    "normalize",
    "stratified_indices",
]
