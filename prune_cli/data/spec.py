"""What a dataset is (``DatasetSpec``, registered in ``DATASETS``) and the rules every dataset shares.

A spec declares its options, its classes and image shape, and a reader that returns the whole
dataset as CPU tensors with its normalisation statistics (``Raw``). ``load_data`` and ``describe``
look the spec up by ``dataset.name``; ``load_data`` then applies the shared split rules in a fixed
order (train ``subset``, ``test_subset``, ``val_split``) and moves the tensors to the device.

Types and ranges of option values are declared here (``check_block`` enforces them, first in the
config checker and again in ``load_data`` for direct callers); what can only be checked against the
read data (sizes, padding against the image size) is checked here after the read, still naming the
option in a ``UserError``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool, Float, Int, Option, Str, check_block, with_default
from prune_cli.core.registry import Registry
from prune_cli.core.seeds import SUBSET_STREAM, TEST_SUBSET_SEED, TEST_SUBSET_STREAM, VAL_STREAM, numpy_rng
from prune_cli.data.container import Data, Split
from prune_cli.data.fingerprint import fingerprint
from prune_cli.data.stream import StreamedImages

DATASETS = Registry("dataset", "dataset.name")


# --------------------------------------------------------------------------- options every dataset has


def _val_split_rule(value) -> str | None:
    if isinstance(value, float):  # a float is a fraction, an int a count: 1.0 is not "1 image"
        return None if 0.0 <= value < 1.0 else f"a fraction must lie in [0, 1); got {value}"
    return None if value >= 0 else f"a count must be >= 0; got {value}"


COMMON_OPTIONS: tuple[Option, ...] = (
    # the YAML files say ${oc.env:PRUNE_CLI_DATA,data}; the declared default is what that gives without the variable
    Str("root", "data", "folder that holds the dataset's files (env PRUNE_CLI_DATA, else ./data)"),
    Bool("download", False, "fetch the dataset into root when its files are missing (needs the network)"),
    Int(
        "subset",
        None,
        "use a stratified subset of this many TRAIN images (drawn with the run seed); null = all",
        lo=1,
        nullable=True,
    ),
    Int(
        "test_subset",
        None,
        "evaluate on a stratified subset of this many test images (same for every seed); null = all",
        lo=1,
        nullable=True,
    ),
    # null was always read as 0, so it stays valid
    Float(
        "val_split",
        0,
        "held out of train (after subset), stratified: int count or fraction in [0, 1); 0 = no val split",
        nullable=True,
        rule=_val_split_rule,
        rule_doc="an int count >= 0 or a fraction in [0, 1)",
    ),
    Int("pad", 0, "random-crop zero padding in pixels (0 = no random crop)", lo=0),
    Bool("flip", False, "random horizontal flip of training images"),
)

_SOURCE_KEYS = ("root", "download")  # a dataset's own options go after these (the order of the YAML files)


def dataset_options(*own: Option, docs: Mapping[str, str] | None = None, **defaults) -> tuple[Option, ...]:
    """``COMMON_OPTIONS`` with this dataset's ``defaults`` (pad, flip) and ``docs``, and its ``own`` options
    after root and download."""
    common = tuple(
        replace(o, doc=docs[o.name]) if docs and o.name in docs else o for o in with_default(COMMON_OPTIONS, **defaults)
    )
    source = tuple(o for o in common if o.name in _SOURCE_KEYS)
    return (*source, *own, *(o for o in common if o.name not in _SOURCE_KEYS))


# --------------------------------------------------------------------------- the spec


@dataclass
class Raw:
    """What a reader returns: CPU tensors before subsetting and moving, and the normalisation statistics."""

    x_train: torch.Tensor | StreamedImages  # uint8 [N, C, H, W] (imagefolder: or its files, decoded when batched)
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor | StreamedImages
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, 0..1 pixel units
    std: tuple[float, ...]
    source: str | None = None  # the folder read, when the reader fell back from dataset.root to another one


class DatasetSpec(abc.ABC):
    """One dataset: its options, its classes and image shape, and how to read it.

    Subclasses are registered with ``@DATASETS.register("<dataset.name>")`` and used as classes (never
    instantiated). ``cfg`` below is the dataset block as ``check_block`` returns it: a plain dict of
    every declared option, defaults filled in, without ``name``.
    """

    name: str = ""  # the registry sets it
    options: tuple[Option, ...] = COMMON_OPTIONS
    shape: tuple[int, int, int] = (0, 0, 0)  # (C, H, W) of every image
    num_classes: int = 0

    @classmethod
    def describe(cls, cfg: dict) -> tuple[tuple[int, int, int], int]:
        """``((C, H, W), num_classes)`` without reading the data: what ``read`` will return."""
        return cls.shape, cls.num_classes

    @classmethod
    @abc.abstractmethod
    def read(cls, cfg: dict) -> Raw:
        """The whole dataset as CPU tensors; missing or malformed files raise UserError("dataset.root", ...)."""


MIN_STD = 1e-3  # a constant channel is not divided by 0


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in 0..1 units (for datasets without published statistics)."""
    xf = x.double().div_(255.0).transpose(0, 1).reshape(x.shape[1], -1)
    return tuple(xf.mean(1).tolist()), tuple(xf.std(1).clamp_min(MIN_STD).tolist())


def chunked_channel_stats(chunks: Iterable[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``channel_stats`` of the images of uint8 ``[n, C, H, W]`` chunks taken together, holding one chunk at a time.

    Per-channel counts of the 256 pixel values add up exactly, so the result does not depend on the chunking."""
    counts = None
    for x in chunks:
        if counts is None:
            counts = np.zeros((x.shape[1], 256), dtype=np.int64)
        for c in range(x.shape[1]):
            counts[c] += np.bincount(x[:, c].ravel(), minlength=256)
    means, stds = [], []
    for count in counts.tolist():  # Python ints: exact sums
        n = sum(count)
        total = sum(v * k for v, k in enumerate(count))
        squares = sum(v * v * k for v, k in enumerate(count))
        means.append(total / n / 255.0)
        stds.append(max(math.sqrt((n * squares - total * total) / (n * (n - 1))) / 255.0, MIN_STD))
    return tuple(means), tuple(stds)


# --------------------------------------------------------------------------- public API


def resolve(cfg) -> tuple[type[DatasetSpec], dict]:
    """The spec ``cfg.name`` names and the checked values of its options (defaults filled in)."""
    spec = DATASETS.get(cfg.get("name"))
    block = {key: cfg[key] for key in cfg if key != "name"}
    return spec, check_block(block, spec.options, "dataset")


def load_data(cfg, seed: int, device: torch.device | str) -> Data:
    """Read the dataset described by ``cfg`` (keys of conf/dataset/*.yaml) onto ``device``."""
    device = torch.device(device)
    spec, values = resolve(cfg)
    name, pad = spec.name, values["pad"]
    raw = spec.read(values)
    _check_raw(raw, name)
    identity = fingerprint(raw.x_train, raw.y_train, raw.x_test, raw.y_test)  # of all the files hold, before subsets

    h, w = raw.x_train.shape[2:]
    if pad >= min(h, w):
        raise UserError("dataset.pad", f"{pad} is not smaller than the {h}x{w} images of {name}")

    # the order subset -> test_subset -> val_split, and each one's seed and stream, fix which images a run sees
    x_tr, y_tr, x_te, y_te = raw.x_train, raw.y_train, raw.x_test, raw.y_test
    subset = _fits("subset", values["subset"], len(y_tr), f"the {len(y_tr)}-image train split of {name}")
    if subset is not None and subset < len(y_tr):
        idx = stratified_indices(y_tr, subset, numpy_rng(seed, SUBSET_STREAM))
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    test_subset = _fits("test_subset", values["test_subset"], len(y_te), f"the {len(y_te)}-image test split of {name}")
    if test_subset is not None and test_subset < len(y_te):
        idx = stratified_indices(y_te, test_subset, numpy_rng(TEST_SUBSET_SEED, TEST_SUBSET_STREAM))
        x_te, y_te = x_te[idx], y_te[idx]

    val = None
    n_val = _val_count(values["val_split"], len(y_tr), name)
    if n_val:
        val_idx = stratified_indices(y_tr, n_val, numpy_rng(seed, VAL_STREAM))
        keep = torch.ones(len(y_tr), dtype=torch.bool)
        keep[val_idx] = False
        val = Split(x_tr[val_idx].to(device), y_tr[val_idx].to(device))
        x_tr, y_tr = x_tr[keep], y_tr[keep]

    return Data(
        name=name,
        train=Split(x_tr.contiguous().to(device), y_tr.to(device)),
        test=Split(x_te.contiguous().to(device), y_te.to(device)),
        val=val,
        num_classes=raw.num_classes,
        mean=torch.tensor(raw.mean, dtype=torch.float32, device=device),
        std=torch.tensor(raw.std, dtype=torch.float32, device=device),
        pad=pad,
        flip=values["flip"],
        fingerprint=identity,
        source=raw.source,
    )


def describe(cfg) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), num_classes)`` of the dataset ``cfg`` names, without loading it.

    Equals ``(data.input_shape, data.num_classes)`` of ``load_data(cfg, ...)``.
    """
    spec, values = resolve(cfg)
    return spec.describe(values)


def stratified_indices(y: torch.Tensor | np.ndarray, n: int, rng: np.random.Generator) -> torch.Tensor:
    """Sorted indices of ``n`` samples keeping class proportions.

    Class k gets ``floor(n * count_k / N)``; the few left over go to the classes with the largest
    remainders (ties: smaller class id), so the total is exactly ``n``. Members are drawn with
    ``rng``, hence deterministic for a given seed.
    """
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    total = len(y)
    if not 0 <= n <= total:
        raise ValueError(f"cannot pick {n} of {total}")
    classes, counts = np.unique(y, return_counts=True)
    quota, remainder = np.divmod(n * counts.astype(np.int64), total)
    extra = n - int(quota.sum())
    quota[np.lexsort((classes, -remainder))[:extra]] += 1
    picks = [rng.permutation(np.flatnonzero(y == k))[:q] for k, q in zip(classes, quota)]
    idx = np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(idx.astype(np.int64))


# --------------------------------------------------------------------------- checks against the read data


def _fits(key: str, value: int | None, total: int, what: str) -> int | None:
    """``value`` (a checked count or None) unless it asks for more images than the split has."""
    if value is not None and value > total:
        raise UserError(f"dataset.{key}", f"{value} is larger than {what}; use at most {total} or null")
    return value


def _val_count(value: float | None, n_train: int, name: str) -> int:
    """Images to hold out for validation: a count as given, a fraction of ``n_train`` rounded (at least 1)."""
    if value is None or value == 0:
        return 0
    count = max(1, int(round(value * n_train))) if isinstance(value, float) else value
    if count >= n_train:
        raise UserError(
            "dataset.val_split",
            f"holding out {count} images leaves none of the "
            f"{n_train} train images of {name} for training; use a smaller value",
        )
    return count


def _check_raw(raw: Raw, name: str) -> None:
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        assert x.dtype == torch.uint8 and len(x.shape) == 4, (name, split, x.dtype, x.shape)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],), (name, split, y.shape)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= raw.num_classes):
            raise UserError(
                "dataset.root",
                f"{name} {split} labels fall outside 0..{raw.num_classes - 1}; "
                "the files are malformed, replace them with the original ones",
            )
    if raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        raise UserError(
            "dataset.root",
            f"{name} train and test images differ in shape "
            f"({tuple(raw.x_train.shape[1:])} vs {tuple(raw.x_test.shape[1:])})",
        )
