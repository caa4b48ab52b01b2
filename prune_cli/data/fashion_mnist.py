"""Fashion-MNIST: the four idx-ubyte files (raw or .gz), read with torchvision's loader.

60,000 train / 10,000 test grayscale images of 28x28 in 10 classes. Looks in
``root/FashionMNIST/raw``, then in the folder of Debian's ``dataset-fashion-mnist`` package.
Compressed or borrowed files are unpacked into a temporary folder: the data folders stay untouched.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile

from prune_cli.core.errors import UserError
from prune_cli.data.files import brief, data_root, download_error
from prune_cli.data.spec import DATASETS, DatasetSpec, Raw, dataset_options

# Debian's `dataset-fashion-mnist` package installs the four original .gz files here
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _sources(folder: str) -> dict[str, str] | None:
    """file name -> path of the raw or .gz copy in ``folder``; None unless all four are there."""
    found = {}
    for f in FILES:
        for candidate in (os.path.join(folder, f), os.path.join(folder, f + ".gz")):
            if os.path.isfile(candidate):
                found[f] = candidate
                break
        else:
            return None
    return found


@DATASETS.register("fashion_mnist")
class FashionMNIST(DatasetSpec):
    """Fashion-MNIST from root/FashionMNIST/raw or Debian's copy; published statistics."""

    options = dataset_options(
        pad=2,
        flip=True,
        docs={
            "root": "folder that holds FashionMNIST/raw/ (env PRUNE_CLI_DATA, else ./data); "
            f"falls back to {DEBIAN_FASHION_MNIST}",
            "download": "fetch the four .gz files into root/FashionMNIST/raw when missing (needs the network)",
        },
    )
    shape, num_classes = (1, 28, 28), 10
    mean, std = (0.2860,), (0.3530,)

    @classmethod
    def read(cls, cfg: dict) -> Raw:
        import torchvision.datasets as tvd  # its first import takes seconds: only when Fashion-MNIST is read

        root = data_root(cfg)
        raw_folder = os.path.join(root, "FashionMNIST", "raw")
        sources = _find_sources(root, raw_folder, cfg["download"], tvd.FashionMNIST)
        folder_read = os.path.dirname(sources[FILES[0]])
        if all(not p.endswith(".gz") for p in sources.values()) and folder_read == raw_folder:
            tr, te = _read_torchvision(root, sources, tvd.FashionMNIST)
        else:  # decompress (or link) into a private torchvision layout; the data folder stays untouched
            with tempfile.TemporaryDirectory(prefix="prune_cli_fmnist_") as tmp:
                raw = os.path.join(tmp, "FashionMNIST", "raw")
                os.makedirs(raw)
                _unpack(sources, raw)
                tr, te = _read_torchvision(tmp, sources, tvd.FashionMNIST)
        return Raw(
            tr.data.unsqueeze(1).contiguous(),
            tr.targets.long(),
            te.data.unsqueeze(1).contiguous(),
            te.targets.long(),
            cls.num_classes,
            cls.mean,
            cls.std,
            source=None if folder_read == raw_folder else folder_read,  # the run records and prints the fallback
        )


def _find_sources(root: str, raw_folder: str, download: bool, reader) -> dict[str, str]:
    """The four files: in ``raw_folder``, else Debian's copy, else downloaded there (``download``), else an error."""
    sources = _sources(raw_folder)
    if sources is None and os.path.isdir(DEBIAN_FASHION_MNIST):
        sources = _sources(DEBIAN_FASHION_MNIST)  # Raw.source names it: the run prints and records the fallback
    if sources is None and download:
        try:
            reader(root, train=True, download=True)
        except Exception as e:
            raise download_error(
                "Fashion-MNIST", root, e, f"put the four *-ubyte.gz files of Fashion-MNIST into {raw_folder}"
            ) from None
        sources = _sources(raw_folder)
    if sources is None:
        raise UserError(
            "dataset.root",
            f"no Fashion-MNIST in {raw_folder}; put {', '.join(f + '[.gz]' for f in FILES)} "
            f"there, install Debian's dataset-fashion-mnist package ({DEBIAN_FASHION_MNIST}), "
            "or run with dataset.download=true",
        )
    return sources


def _read_torchvision(tv_root: str, sources: dict[str, str], reader) -> tuple:
    """(train, test) read by torchvision's loader from ``tv_root/FashionMNIST/raw``, or one line why not."""
    try:
        return reader(tv_root, train=True, download=False), reader(tv_root, train=False, download=False)
    except Exception as e:
        folder = os.path.dirname(next(iter(sources.values())))
        raise UserError(
            "dataset.root",
            f"cannot read the Fashion-MNIST files in {folder} ({brief(e)}); "
            "replace them with the original idx-ubyte files",
        ) from None


def _unpack(sources: dict[str, str], raw: str) -> None:
    """Each file into ``raw``: decompressed from its .gz, or linked."""
    for f, src in sources.items():
        dst = os.path.join(raw, f)
        try:
            if src.endswith(".gz"):
                with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
                    shutil.copyfileobj(fin, fout)
            else:
                os.symlink(src, dst)
        except (OSError, EOFError) as e:
            raise UserError(
                "dataset.root", f"cannot decompress {src} ({brief(e)}); replace it with the original file"
            ) from None
