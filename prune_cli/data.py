"""Datasets as uint8 tensors on the training device, batched by index, augmented on the device.

Every dataset is decoded once into ``uint8 [N, C, H, W]`` images and ``int64 [N]`` labels,
moved to the device, and then only indexed: no DataLoader, no workers, no per-sample Python.
Random crop (zero padding) and horizontal flip run on whole batches with advanced indexing.

Supported ``dataset.name`` values: cifar10, cifar100, tinyimagenet200, fashion_mnist, digits,
synthetic (see conf/dataset/*.yaml). Bad input raises ``UserError`` naming the option and
saying where we looked and how to fix it.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)

NAMES = ("cifar10", "cifar100", "tinyimagenet200", "fashion_mnist", "digits", "synthetic")

# (pad, flip) used when the config does not say
DEFAULT_AUGMENT = {
    "cifar10": (4, True),
    "cifar100": (4, True),
    "tinyimagenet200": (4, True),
    "fashion_mnist": (2, True),
    "digits": (1, False),
    "synthetic": (0, False),
}

# Debian's `dataset-fashion-mnist` package installs the four original .gz files here
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_CACHE = "prune_cli_cache.pt"
TINY_CACHE_VERSION = 1

SYNTHETIC_SEED = 20240607  # synthetic images never depend on the run seed
DIGITS_SPLIT_SEED = 0      # the digits train/test split is fixed forever
TEST_SUBSET_SEED = 0       # test_subset picks the same images for every run seed


# --------------------------------------------------------------------------- containers


@dataclass
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W] on the device
    y: torch.Tensor  # int64 [N] on the device

    def __len__(self) -> int:
        return int(self.y.shape[0])

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

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)


@dataclass
class _Raw:
    """What a dataset reader returns: CPU tensors before subsetting and moving."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# --------------------------------------------------------------------------- public API


def load_data(cfg, seed: int, device: torch.device | str) -> Data:
    """Read the dataset described by ``cfg`` (keys of conf/dataset/*.yaml) onto ``device``."""
    device = torch.device(device)
    name = _get(cfg, "name")
    if name not in NAMES:
        raise UserError("dataset.name", f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    download = _get(cfg, "download", False)
    if not isinstance(download, bool):
        raise UserError("dataset.download", f"must be true or false, got {download!r}")
    default_pad, default_flip = DEFAULT_AUGMENT[name]
    pad = _get(cfg, "pad", default_pad)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise UserError("dataset.pad", f"must be an integer >= 0 (0 = no random crop), got {pad!r}")
    flip = _get(cfg, "flip", default_flip)
    if not isinstance(flip, bool):
        raise UserError("dataset.flip", f"must be true or false, got {flip!r}")
    # types and signs are checked before the (possibly slow) read, sizes after it
    subset = _count_option(cfg, "subset")
    test_subset = _count_option(cfg, "test_subset")
    val_split = _get(cfg, "val_split", 0)
    _val_count(val_split, None, name)

    reader = {
        "cifar10": _read_cifar,
        "cifar100": _read_cifar,
        "tinyimagenet200": _read_tinyimagenet,
        "fashion_mnist": _read_fashion_mnist,
        "digits": _read_digits,
        "synthetic": _read_synthetic,
    }[name]
    raw = reader(cfg, name, download)
    _check_raw(raw, name)

    h, w = raw.x_train.shape[2:]
    if pad >= min(h, w):
        raise UserError("dataset.pad", f"{pad} is not smaller than the {h}x{w} images of {name}")

    x_tr, y_tr, x_te, y_te = raw.x_train, raw.y_train, raw.x_test, raw.y_test
    subset = _count_option(cfg, "subset", len(y_tr), f"the {len(y_tr)}-image train split of {name}")
    if subset is not None and subset < len(y_tr):
        idx = stratified_indices(y_tr, subset, _rng(seed, 1))
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    test_subset = _count_option(cfg, "test_subset", len(y_te), f"the {len(y_te)}-image test split of {name}")
    if test_subset is not None and test_subset < len(y_te):
        idx = stratified_indices(y_te, test_subset, _rng(TEST_SUBSET_SEED, 2))
        x_te, y_te = x_te[idx], y_te[idx]

    val = None
    n_val = _val_count(val_split, len(y_tr), name)
    if n_val:
        val_idx = stratified_indices(y_tr, n_val, _rng(seed, 3))
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
        flip=flip,
    )


def describe(cfg) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), num_classes)`` of the dataset ``cfg`` names, without loading it.

    Equals ``(data.input_shape, data.num_classes)`` of ``load_data(cfg, ...)``. For TinyImageNet
    a folder that is present is consulted (wnids.txt and one image), else the standard 64x64x200.
    """
    name = _get(cfg, "name")
    fixed = {
        "cifar10": ((3, 32, 32), 10),
        "cifar100": ((3, 32, 32), 100),
        "fashion_mnist": ((1, 28, 28), 10),
        "digits": ((1, 8, 8), 10),
        "tinyimagenet200": ((3, 64, 64), 200),
    }
    if name == "synthetic":
        v = _synthetic_options(cfg)
        return (v["channels"], v["image_size"], v["image_size"]), v["num_classes"]
    if name not in fixed:
        raise UserError("dataset.name", f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    if name == "tinyimagenet200":
        return _describe_tiny(cfg) or fixed[name]
    return fixed[name]


def _describe_tiny(cfg):
    try:
        base = os.path.join(_root(cfg), "tiny-imagenet-200")
        with open(os.path.join(base, "wnids.txt")) as f:
            wnids = sorted({line.strip() for line in f if line.strip()})
        folder = os.path.join(base, "train", wnids[0], "images")
        first = min(f for f in os.listdir(folder) if f.lower().endswith((".jpeg", ".jpg")))
        from PIL import Image
        with Image.open(os.path.join(folder, first)) as img:
            w, h = img.size
        return (3, h, w), len(wnids)
    except (OSError, IndexError, ValueError, UserError):
        return None  # not there (yet): load_data will say what is wrong


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
    b, c, h, w = x.shape
    dy, dx, flipped = _augment_params(b, pad, flip, generator, x.device)
    if not pad:
        return torch.where(flipped[:, None, None, None], x.flip(-1), x)
    hp, wp = h + 2 * pad, w + 2 * pad
    padded = x.new_zeros(b, c, hp, wp)  # (faster than F.pad for uint8 on CPU)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = ar_h[None, :] + dy[:, None]                                                    # [B, H]
    cols = torch.where(flipped[:, None], (w - 1 - ar_w)[None, :], ar_w[None, :]) + dx[:, None]  # [B, W]
    idx = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, hp * wp).gather(2, idx).view(b, c, h, w)


def batches(
    split: Split,
    data: Data,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    train: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(normalised float x, y)`` batches covering the split once (last batch may be short).

    With ``generator`` the order is ``torch.randperm`` drawn from it; ``train=True`` augments
    (when ``data.pad`` or ``data.flip``) with the same generator.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(split)
    order = None
    if generator is not None:
        order = torch.randperm(n, generator=generator, device=generator.device).to(split.x.device)
    do_aug = train and (data.pad > 0 or data.flip)
    for start in range(0, n, batch_size):
        if order is None:
            xb, yb = split.x[start:start + batch_size], split.y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            xb, yb = split.x[idx], split.y[idx]
        if do_aug:
            xb = augment(xb, data.pad, data.flip, generator)
        yield normalize(xb, data), yb


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


# --------------------------------------------------------------------------- helpers


def _get(cfg, key: str, default=None):
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**63, stream])


def _root(cfg) -> str:
    root = _get(cfg, "root")
    if root is None or str(root).strip() == "":
        raise UserError("dataset.root", "is empty; give the folder that holds the datasets "
                        "(or set the PRUNE_CLI_DATA environment variable)")
    root = os.path.expanduser(str(root))
    try:  # relative to where the user started the command, also under a Hydra run dir
        from hydra.utils import to_absolute_path
        return to_absolute_path(root)
    except Exception:  # pragma: no cover - hydra missing or unusual state
        return os.path.abspath(root)


def _count_option(cfg, key: str, total: int | None = None, what: str = "") -> int | None:
    value = _get(cfg, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"dataset.{key}", f"must be a whole number of images or null, got {value!r}")
    if value <= 0:
        raise UserError(f"dataset.{key}", f"must be > 0 (or null for all images), got {value}")
    if total is not None and value > total:
        raise UserError(f"dataset.{key}", f"{value} is larger than {what}; use at most {total} or null")
    return value


def _val_count(value, n_train: int | None, name: str) -> int:
    """Images to hold out for validation (``n_train`` None: only check the value's type and range)."""
    if value is None or value == 0:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError("dataset.val_split", f"must be a count (int) or a fraction in [0, 1), got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value < 1.0:
            raise UserError("dataset.val_split", f"a fraction must lie in [0, 1), got {value}")
        if n_train is None:
            return 0
        count = max(1, int(round(value * n_train)))
    else:
        if value < 0:
            raise UserError("dataset.val_split", f"must be >= 0, got {value}")
        count = value
    if n_train is None:
        return 0
    if count >= n_train:
        raise UserError("dataset.val_split", f"holding out {count} images leaves none of the "
                        f"{n_train} train images of {name} for training; use a smaller value")
    return count


def _check_raw(raw: _Raw, name: str) -> None:
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        assert x.dtype == torch.uint8 and x.ndim == 4, (name, split, x.dtype, x.shape)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],), (name, split, y.shape)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= raw.num_classes):
            raise UserError("dataset.root", f"{name} {split} labels fall outside 0..{raw.num_classes - 1}; "
                            "the files are malformed, replace them with the original ones")
    if raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        raise UserError("dataset.root", f"{name} train and test images differ in shape "
                        f"({tuple(raw.x_train.shape[1:])} vs {tuple(raw.x_test.shape[1:])})")


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.double().div_(255.0).transpose(0, 1).reshape(x.shape[1], -1)
    return tuple(xf.mean(1).tolist()), tuple(xf.std(1).clamp_min(1e-3).tolist())


def _brief(err: BaseException) -> str:
    """``Type: first line ... last line`` of the message, for one-line error messages."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(err).__name__}: {text[:300]}"


def _download_error(what: str, root: str, err: BaseException, how: str) -> UserError:
    return UserError("dataset.download", f"could not download {what} into {root} ({_brief(err)}); "
                     f"{how}, then run with dataset.download=false")


# --------------------------------------------------------------------------- CIFAR


_CIFAR_INFO = {
    # name: (torchvision class name, title, num_classes, mean, std)
    "cifar10": ("CIFAR10", "CIFAR-10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", "CIFAR-100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar_class(base: type, check_md5: bool) -> type:
    """torchvision's CIFAR class, or a subclass whose file checks test existence instead of md5."""
    if check_md5:
        return base
    return type(
        base.__name__,
        (base,),
        {
            "train_list": [[f, None] for f, _ in base.train_list],
            "test_list": [[f, None] for f, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        },
    )


def _read_cifar(cfg, name: str, download: bool) -> _Raw:
    import torchvision.datasets as tvd

    root = _root(cfg)
    cls_name, title, num_classes, mean, std = _CIFAR_INFO[name]
    check_md5 = _get(cfg, "check_md5", True)
    if not isinstance(check_md5, bool):
        raise UserError("dataset.check_md5", f"must be true or false, got {check_md5!r}")
    cls = _cifar_class(getattr(tvd, cls_name), check_md5)
    base = os.path.join(root, cls.base_folder)
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in files if not os.path.isfile(os.path.join(base, f))]

    if missing and download:
        try:
            cls(root, train=True, download=True)
        except Exception as e:  # URLError, OSError, RuntimeError (md5 of the archive), tarfile errors
            raise _download_error(title, root, e, f"fetch {cls.url} yourself and extract it into {root}") from None
        missing = [f for f in files if not os.path.isfile(os.path.join(base, f))]
    if missing:
        if len(missing) == len(files):
            why = (f"no {title} batches in {base}; put the python version of {title} there "
                   f"(extract {cls.filename} into {root}) or run with dataset.download=true")
        else:
            why = (f"{title} folder {base} is incomplete (missing {', '.join(missing)}); "
                   f"extract {cls.filename} into {root} again or run with dataset.download=true")
        raise UserError("dataset.root", why)

    try:
        train = cls(root, train=True, download=False)
        test = cls(root, train=False, download=False)
    except Exception as e:
        if check_md5 and isinstance(e, RuntimeError) and "corrupted" in str(e):
            raise UserError("dataset.root", f"the {title} files in {base} do not match torchvision's md5 sums "
                            f"(corrupted or not the official python version); extract {cls.filename} into {root} "
                            "again, or set dataset.check_md5=false to load them as they are") from None
        # unpickling / reshape errors of a malformed file
        raise UserError("dataset.root", f"cannot read the {title} batches in {base} ({_brief(e)}); "
                        f"extract {cls.filename} into {root} again") from None

    def tensors(ds):
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return x, torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))

    x_tr, y_tr = tensors(train)
    x_te, y_te = tensors(test)
    return _Raw(x_tr, y_tr, x_te, y_te, num_classes, mean, std)


# --------------------------------------------------------------------------- Fashion-MNIST


_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _fmnist_sources(folder: str) -> dict[str, str] | None:
    """file name -> path of the raw or .gz copy in ``folder``; None unless all four are there."""
    found = {}
    for f in _FMNIST_FILES:
        for candidate in (os.path.join(folder, f), os.path.join(folder, f + ".gz")):
            if os.path.isfile(candidate):
                found[f] = candidate
                break
        else:
            return None
    return found


def _read_fashion_mnist(cfg, name: str, download: bool) -> _Raw:
    import torchvision.datasets as tvd

    root = _root(cfg)
    raw_folder = os.path.join(root, "FashionMNIST", "raw")
    sources = _fmnist_sources(raw_folder)
    if sources is None and os.path.isdir(DEBIAN_FASHION_MNIST):
        sources = _fmnist_sources(DEBIAN_FASHION_MNIST)
        if sources is not None:
            log.info("Fashion-MNIST: using Debian's copy in %s", DEBIAN_FASHION_MNIST)
    if sources is None and download:
        try:
            tvd.FashionMNIST(root, train=True, download=True)
        except Exception as e:
            raise _download_error("Fashion-MNIST", root, e, f"put the four *-ubyte.gz files of Fashion-MNIST into {raw_folder}") from None
        sources = _fmnist_sources(raw_folder)
    if sources is None:
        raise UserError("dataset.root", f"no Fashion-MNIST in {raw_folder}; put {', '.join(f + '[.gz]' for f in _FMNIST_FILES)} "
                        f"there, install Debian's dataset-fashion-mnist package ({DEBIAN_FASHION_MNIST}), "
                        "or run with dataset.download=true")

    def load(tv_root: str):
        try:
            tr = tvd.FashionMNIST(tv_root, train=True, download=False)
            te = tvd.FashionMNIST(tv_root, train=False, download=False)
        except Exception as e:
            folder = os.path.dirname(next(iter(sources.values())))
            raise UserError("dataset.root", f"cannot read the Fashion-MNIST files in {folder} ({_brief(e)}); "
                            "replace them with the original idx-ubyte files") from None
        return tr, te

    if all(not p.endswith(".gz") for p in sources.values()) and os.path.dirname(sources[_FMNIST_FILES[0]]) == raw_folder:
        tr, te = load(root)
    else:  # decompress (or link) into a private torchvision layout; the data folder stays untouched
        with tempfile.TemporaryDirectory(prefix="prune_cli_fmnist_") as tmp:
            raw = os.path.join(tmp, "FashionMNIST", "raw")
            os.makedirs(raw)
            for f, src in sources.items():
                dst = os.path.join(raw, f)
                try:
                    if src.endswith(".gz"):
                        with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
                            shutil.copyfileobj(fin, fout)
                    else:
                        os.symlink(src, dst)
                except (OSError, EOFError) as e:
                    raise UserError("dataset.root", f"cannot decompress {src} ({_brief(e)}); replace it with the original file") from None
            tr, te = load(tmp)

    return _Raw(tr.data.unsqueeze(1).contiguous(), tr.targets.long(), te.data.unsqueeze(1).contiguous(),
                te.targets.long(), 10, (0.2860,), (0.3530,))


# --------------------------------------------------------------------------- digits


def _read_digits(cfg, name: str, download: bool) -> _Raw:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    test_idx = stratified_indices(y, int(round(0.2 * len(y))), _rng(DIGITS_SPLIT_SEED, 0))
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test_idx] = True
    x_tr, y_tr = x[~is_test].contiguous(), y[~is_test]
    mean, std = _channel_stats(x_tr)
    return _Raw(x_tr, y_tr, x[is_test].contiguous(), y[is_test], 10, mean, std)


# --------------------------------------------------------------------------- synthetic


def _synthetic_options(cfg) -> dict[str, int]:
    vals = {}
    for key, default in (("channels", 3), ("image_size", 32), ("num_classes", 10), ("train_size", 512), ("test_size", 256)):
        v = _get(cfg, key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise UserError(f"dataset.{key}", f"must be a positive integer, got {v!r}")
        vals[key] = v
    if vals["num_classes"] < 2:
        raise UserError("dataset.num_classes", f"must be at least 2, got {vals['num_classes']}")
    return vals


def _read_synthetic(cfg, name: str, download: bool) -> _Raw:
    vals = _synthetic_options(cfg)
    c, s, k = vals["channels"], vals["image_size"], vals["num_classes"]

    # each class: a smooth random pattern (coarse grid upsampled) in 48..207; samples add noise
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    coarse = torch.rand(k, c, max(2, s // 8), max(2, s // 8), generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    patterns = 48.0 + 160.0 * patterns

    def make(n: int, stream: int):
        gen = torch.Generator().manual_seed(SYNTHETIC_SEED + stream)
        y = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, c, s, s, generator=gen) * 32.0
        x = (patterns[y] + noise).round_().clamp_(0, 255).to(torch.uint8)
        return x, y.long()

    x_tr, y_tr = make(vals["train_size"], 1)
    x_te, y_te = make(vals["test_size"], 2)
    mean, std = _channel_stats(x_tr)
    return _Raw(x_tr, y_tr, x_te, y_te, k, mean, std)


# --------------------------------------------------------------------------- TinyImageNet-200


def _tiny_index(base: str):
    """(sorted wnids, train files per class, val (file, class) list, signature) of the folder."""
    def malformed(why: str) -> UserError:
        return UserError("dataset.root", f"malformed TinyImageNet-200 folder {base}: {why}; "
                         "unzip tiny-imagenet-200.zip there again")

    wnids_path = os.path.join(base, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise malformed("no wnids.txt")
    with open(wnids_path) as f:
        wnids = sorted({line.strip() for line in f if line.strip()})
    if not wnids:
        raise malformed("wnids.txt is empty")
    cls_of = {w: i for i, w in enumerate(wnids)}

    train = []
    for w in wnids:
        folder = os.path.join(base, "train", w, "images")
        if not os.path.isdir(folder):
            raise malformed(f"missing {folder}")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpeg", ".jpg")))
        if not files:
            raise malformed(f"no JPEG files in {folder}")
        train.append([os.path.join(folder, f) for f in files])

    ann_path = os.path.join(base, "val", "val_annotations.txt")
    if not os.path.isfile(ann_path):
        raise malformed(f"missing {ann_path}")
    with open(ann_path, "rb") as f:
        ann_bytes = f.read()
    val = []
    for n, line in enumerate(ann_bytes.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1].strip() not in cls_of:
            raise malformed(f"line {n} of {ann_path} is not 'file<TAB>wnid<TAB>...' with a wnid from wnids.txt")
        path = os.path.join(base, "val", "images", parts[0].strip())
        if not os.path.isfile(path):
            raise malformed(f"{path} (named in val_annotations.txt) does not exist")
        val.append((path, cls_of[parts[1].strip()]))
    if not val:
        raise malformed(f"{ann_path} lists no images")

    h = hashlib.sha256()
    h.update(repr((TINY_CACHE_VERSION, wnids, [[os.path.basename(p) for p in t] for t in train])).encode())
    h.update(ann_bytes)
    return wnids, train, val, h.hexdigest()


def _decode_images(paths: list[str]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    def decode(path: str) -> np.ndarray:
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise UserError("dataset.root", f"cannot decode {path} ({_brief(e)}); replace it with the original file "
                            "(unzip tiny-imagenet-200.zip again)") from None

    first = decode(paths[0])
    out = np.empty((len(paths), 3, *first.shape[:2]), dtype=np.uint8)

    def fill(i: int) -> None:
        arr = first if i == 0 else decode(paths[i])
        if arr.shape != first.shape:
            raise UserError("dataset.root", f"{paths[i]} is {arr.shape[1]}x{arr.shape[0]}, not "
                            f"{first.shape[1]}x{first.shape[0]} like the other TinyImageNet images")
        out[i] = arr.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(fill, range(len(paths)), chunksize=256))
    return out


def _read_tinyimagenet(cfg, name: str, download: bool) -> _Raw:
    root = _root(cfg)
    base = os.path.join(root, "tiny-imagenet-200")
    if not os.path.isdir(base) and download:
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(TINY_URL, download_root=root, md5=TINY_ZIP_MD5)
        except Exception as e:
            raise _download_error("TinyImageNet-200", root, e, f"fetch {TINY_URL} yourself and unzip it into {root}") from None
    if not os.path.isdir(base):
        raise UserError("dataset.root", f"no TinyImageNet-200 folder {base}; unzip tiny-imagenet-200.zip "
                        f"({TINY_URL}) into {root} or run with dataset.download=true")

    wnids, train, val, signature = _tiny_index(base)
    cache = os.path.join(base, TINY_CACHE)
    if os.path.isfile(cache):
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True, mmap=True)
            if blob.get("signature") == signature:
                return _tiny_raw(blob, len(wnids))
            log.info("TinyImageNet: %s is stale, decoding the JPEGs again", cache)
        except Exception as e:  # truncated or foreign file: rebuild it
            log.warning("TinyImageNet: ignoring unreadable cache %s (%s)", cache, e)

    log.info("TinyImageNet: decoding %d JPEGs once (cached in %s)", sum(map(len, train)) + len(val), cache)
    train_paths = [p for files in train for p in files]
    blob = {
        "signature": signature,
        "wnids": wnids,
        "train_x": torch.from_numpy(_decode_images(train_paths)),
        "train_y": torch.tensor([k for k, files in enumerate(train) for _ in files], dtype=torch.int64),
        "test_x": torch.from_numpy(_decode_images([p for p, _ in val])),
        "test_y": torch.tensor([k for _, k in val], dtype=torch.int64),
    }
    tmp = f"{cache}.tmp.{os.getpid()}"
    try:
        torch.save(blob, tmp)
        os.replace(tmp, cache)
    except OSError as e:  # read-only data folder: work without a cache
        log.warning("TinyImageNet: could not write the cache %s (%s); the JPEGs will be decoded again next time", cache, e)
        try:
            os.remove(tmp)
        except OSError:
            pass
    return _tiny_raw(blob, len(wnids))


def _tiny_raw(blob: dict, num_classes: int) -> _Raw:
    return _Raw(blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], num_classes,
                (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))


def _augment_params(b: int, pad: int, flip: bool, generator: torch.Generator | None, device: torch.device):
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
