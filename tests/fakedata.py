"""Tiny datasets written in the exact on-disk formats of the real ones, for tests.

Each ``make_*`` writes files under ``root`` and returns a :class:`Fake` with the uint8
``[N, C, H, W]`` images and int64 labels that a correct loader must read back, so tests can
compare pixel for pixel. Pixel content is deterministic and label dependent.

Formats reproduced:
- CIFAR-10 / CIFAR-100: the "python version" pickles (``data_batch_1..5``, ``test_batch``,
  ``batches.meta`` / ``train``, ``test``, ``meta``), written as Python 2 pickles like the
  originals, so keys load as ``b'data'`` with ``encoding='bytes'`` and as ``'data'`` with
  ``encoding='latin1'`` (what torchvision uses). Their md5 sums differ from the official files,
  so torchvision's CIFAR loader rejects them unless ``dataset.check_md5=false``.
- TinyImageNet-200: ``wnids.txt``, ``words.txt``, ``train/<wnid>/images/*.JPEG`` with
  ``<wnid>_boxes.txt``, ``val/images/*.JPEG`` with ``val/val_annotations.txt``, ``test/images``.
  JPEG is lossy: the returned arrays are what PIL decodes from the written files.
- Fashion-MNIST: the four idx-ubyte files in ``<root>/FashionMNIST/raw`` (raw or ``.gz``).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Fake",
    "make_cifar10",
    "make_cifar100",
    "make_tinyimagenet",
    "make_fashion_mnist",
    "fake_pixels",
    "fake_labels",
    "cifar_cfg",
]


@dataclass
class Fake:
    x_train: torch.Tensor  # uint8 [N, C, H, W]
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]


def fake_labels(n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Every class present (when n allows), unequal counts, shuffled deterministically."""
    rng = np.random.default_rng(seed)
    base = np.arange(n) % num_classes
    # make class 0 over-represented so proportions are not trivially uniform
    base[: n // 5] = 0
    return rng.permutation(base).astype(np.int64)


def fake_pixels(labels: np.ndarray, c: int, h: int, w: int, offset: int = 0) -> np.ndarray:
    """uint8 [N, C, H, W]: a label-dependent gradient plus a per-image offset."""
    n = len(labels)
    i = np.arange(n)[:, None, None, None] + offset
    k = np.asarray(labels)[:, None, None, None]
    ch = np.arange(c)[None, :, None, None]
    yy = np.arange(h)[None, None, :, None]
    xx = np.arange(w)[None, None, None, :]
    return ((k * 23 + ch * 71 + yy * 5 + xx * 3 + i * 7) % 256).astype(np.uint8)


# --------------------------------------------------------------------------- Python 2 pickles


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING opcodes), as cPickle did for CIFAR."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump_py2(obj, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    """[N, 3, 32, 32] -> [N, 3072] rows: 1024 red, 1024 green, 1024 blue, row-major."""
    return np.ascontiguousarray(x.reshape(len(x), -1))


def make_cifar10(root, n_train: int = 100, n_test: int = 40) -> Fake:
    """Write ``<root>/cifar-10-batches-py`` with n_train images over the 5 train batches."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    y_tr, y_te = fake_labels(n_train, 10, 1), fake_labels(n_test, 10, 2)
    x_tr, x_te = fake_pixels(y_tr, 3, 32, 32), fake_pixels(y_te, 3, 32, 32, offset=1000)
    bounds = np.linspace(0, n_train, 6).astype(int)
    for b in range(5):
        lo, hi = bounds[b], bounds[b + 1]
        _dump_py2(
            {
                b"batch_label": f"training batch {b + 1} of 5".encode(),
                b"labels": [int(v) for v in y_tr[lo:hi]],
                b"data": _cifar_rows(x_tr[lo:hi]),
                b"filenames": [f"fake_{i:05d}.png".encode() for i in range(lo, hi)],
            },
            folder / f"data_batch_{b + 1}",
        )
    _dump_py2(
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [int(v) for v in y_te],
            b"data": _cifar_rows(x_te),
            b"filenames": [f"fake_test_{i:05d}.png".encode() for i in range(n_test)],
        },
        folder / "test_batch",
    )
    _dump_py2(
        {
            b"num_cases_per_batch": int(bounds[1] - bounds[0]),
            b"label_names": [n.encode() for n in names],
            b"num_vis": 3072,
        },
        folder / "batches.meta",
    )
    (folder / "readme.html").write_text("<html>fake CIFAR-10 for tests</html>\n")
    return Fake(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te), names)


def make_cifar100(root, n_train: int = 300, n_test: int = 200) -> Fake:
    """Write ``<root>/cifar-100-python`` (``train``, ``test``, ``meta``)."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    fine = [f"fine_{k:02d}" for k in range(100)]
    coarse = [f"coarse_{k:02d}" for k in range(20)]
    y_tr, y_te = fake_labels(n_train, 100, 3), fake_labels(n_test, 100, 4)
    x_tr, x_te = fake_pixels(y_tr, 3, 32, 32), fake_pixels(y_te, 3, 32, 32, offset=1000)
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        _dump_py2(
            {
                b"filenames": [f"fake_{split}_{i:05d}.png".encode() for i in range(len(y))],
                b"batch_label": f"{'training' if split == 'train' else 'testing'} batch 1 of 1".encode(),
                b"fine_labels": [int(v) for v in y],
                b"coarse_labels": [int(v) // 5 for v in y],
                b"data": _cifar_rows(x),
            },
            folder / split,
        )
    _dump_py2(
        {
            b"fine_label_names": [n.encode() for n in fine],
            b"coarse_label_names": [n.encode() for n in coarse],
        },
        folder / "meta",
    )
    return Fake(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te), fine)


def dataset_cfg(name: str, root, **overrides) -> dict:
    """A dataset config for fake files under ``root``: all of them, no split, pad 4 and flip, ``overrides`` on top."""
    cfg = {
        "name": name,
        "root": str(root),
        "download": False,
        "subset": None,
        "test_subset": None,
        "val_split": 0,
        "pad": 4,
        "flip": True,
    }
    cfg.update(overrides)
    return cfg


def cifar_cfg(name: str, root, **overrides) -> dict:
    """A dataset config for fake CIFAR files (md5 check off: the fakes are not the official files)."""
    return dataset_cfg(name, root, **{"check_md5": False, **overrides})


# --------------------------------------------------------------------------- TinyImageNet-200


def make_tinyimagenet(
    root, n_classes: int = 3, n_train_per_class: int = 4, n_val_per_class: int = 2, size: int = 64
) -> Fake:
    """Write ``<root>/tiny-imagenet-200`` in the original layout with real JPEG files.

    wnids.txt is written unsorted (as in the original); class index = position in sorted order.
    One train image is saved as a grayscale JPEG, as a few originals are.
    """
    from PIL import Image

    base = Path(root) / "tiny-imagenet-200"
    wnids = [f"n{1443537 + 7919 * k:08d}" for k in range(n_classes)]
    listed = wnids[::-1]  # not sorted on disk
    sorted_wnids = sorted(wnids)
    (base / "train").mkdir(parents=True, exist_ok=True)
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    (base / "test" / "images").mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in listed))
    (base / "words.txt").write_text("".join(f"{w}\tfake class {w}\n" for w in listed))

    def save(arr_chw: np.ndarray, path: Path, gray: bool = False) -> np.ndarray:
        img = Image.fromarray(np.ascontiguousarray(arr_chw.transpose(1, 2, 0)))
        if gray:
            img = img.convert("L")
        img.save(path, format="JPEG", quality=95)
        with Image.open(path) as back:
            return np.asarray(back.convert("RGB")).transpose(2, 0, 1).copy()

    x_tr, y_tr = [], []
    for k, w in enumerate(sorted_wnids):
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True, exist_ok=True)
        labels = np.full(n_train_per_class, k)
        pix = fake_pixels(labels, 3, size, size, offset=k * 100)
        boxes = []
        for i in range(n_train_per_class):
            name = f"{w}_{i}.JPEG"
            x_tr.append(save(pix[i], folder / name, gray=(k == 0 and i == 0)))
            y_tr.append(k)
            boxes.append(f"{name}\t0\t0\t{size - 1}\t{size - 1}\n")
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))

    x_te, y_te, ann = [], [], []
    n_val = n_classes * n_val_per_class
    val_labels = np.array([i % n_classes for i in range(n_val)])
    pix = fake_pixels(val_labels, 3, size, size, offset=5000)
    for i, k in enumerate(val_labels):
        name = f"val_{i}.JPEG"
        x_te.append(save(pix[i], base / "val" / "images" / name))
        y_te.append(int(k))
        ann.append(f"{name}\t{sorted_wnids[k]}\t1\t2\t{size - 2}\t{size - 3}\n")
    (base / "val" / "val_annotations.txt").write_text("".join(ann))
    save(fake_pixels(np.zeros(1, int), 3, size, size)[0], base / "test" / "images" / "test_0.JPEG")

    return Fake(
        torch.from_numpy(np.stack(x_tr)),
        torch.tensor(y_tr, dtype=torch.int64),
        torch.from_numpy(np.stack(x_te)),
        torch.tensor(y_te, dtype=torch.int64),
        sorted_wnids,
    )


# --------------------------------------------------------------------------- Fashion-MNIST


def _idx_bytes(arr: np.ndarray) -> bytes:
    """The idx format: 0x0000, type 0x08 (ubyte), ndim, big-endian int32 dims, then the data."""
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def make_fashion_mnist(root, n_train: int = 60, n_test: int = 20, *, compressed: bool = False, folder=None) -> Fake:
    """Write the four idx-ubyte files to ``folder`` (default ``<root>/FashionMNIST/raw``).

    ``compressed=True`` writes only the ``.gz`` files, as distributed (and as Debian's
    dataset-fashion-mnist package installs them in /usr/share/datasets/fashion-mnist).
    """
    folder = Path(folder) if folder is not None else Path(root) / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    y_tr, y_te = fake_labels(n_train, 10, 5), fake_labels(n_test, 10, 6)
    x_tr = fake_pixels(y_tr, 1, 28, 28)
    x_te = fake_pixels(y_te, 1, 28, 28, offset=1000)
    for prefix, x, y in (("train", x_tr, y_tr), ("t10k", x_te, y_te)):
        for kind, arr in (("images-idx3", x[:, 0]), ("labels-idx1", y.astype(np.uint8))):
            data = _idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if compressed:
                with gzip.open(folder / (name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (folder / name).write_bytes(data)
    return Fake(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te), names)


def tree(root) -> list[str]:
    """All files under root, relative, sorted (handy in failing-test messages)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


if __name__ == "__main__":  # pragma: no cover - manual inspection
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "fake_data"
    make_cifar10(out), make_cifar100(out), make_tinyimagenet(out), make_fashion_mnist(out)
    print("\n".join(tree(out)))


def make_knockoff_generator(path, seed: int = 0) -> Path:
    """A file in the format of SCOP's official ``netG_cifar.pth`` (``module.``-prefixed keys, as saved from
    DataParallel), holding random weights: a stand-in generator for the smoke runs."""
    from prune_cli.methods.scop.knockoff import CifarKnockoffGenerator

    torch.manual_seed(seed)
    state = {f"module.{k}": v for k, v in CifarKnockoffGenerator().state_dict().items()}
    torch.save(state, path)
    return Path(path)
