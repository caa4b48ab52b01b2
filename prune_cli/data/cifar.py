"""CIFAR-10 and CIFAR-100: the "python version" batches, file names and md5 sums as torchvision knows them.

50,000 train / 10,000 test RGB images of 32x32 with 10 or 100 (fine) classes. The files are checked against the
official md5 sums unless ``dataset.check_md5=false`` (re-packed copies). The batches are pickles: they are read by
an unpickler that builds only what the format holds (dicts, lists, strings, numbers and numpy arrays), so a
crafted batch file cannot run code, whether its md5 was checked or not.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool
from prune_cli.data.files import brief, data_root, download_error
from prune_cli.data.spec import DATASETS, DatasetSpec, Raw, dataset_options

CHECK_MD5 = Bool(
    "check_md5", True, "verify the batch files against torchvision's md5 sums; false loads re-packed copies as they are"
)


# the only globals a CIFAR batch names: numpy's array reconstruction (numpy 1 and 2 spell its module apart)
BATCH_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Python 2 pickles of dicts, lists, strings, numbers and numpy arrays, and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in BATCH_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        return super().find_class(module, name)


def read_batch(path: str) -> dict:
    """One batch file as a dict with str keys (Python 2 strings decode as latin-1, as torchvision reads them)."""
    with open(path, "rb") as f:
        return _BatchUnpickler(f, encoding="latin1").load()


class _Cifar(DatasetSpec):
    """Both CIFARs: they differ only in torchvision class, title, classes and statistics."""

    torchvision_class = ""  # name in torchvision.datasets
    title = ""  # as messages spell it
    shape = (3, 32, 32)
    mean: tuple[float, ...] = ()  # the published per-channel statistics
    std: tuple[float, ...] = ()

    @classmethod
    def read(cls, cfg: dict) -> Raw:
        import torchvision.datasets as tvd  # 1.4 s to import: only CIFAR runs pay it
        from torchvision.datasets.utils import check_integrity, download_and_extract_archive

        root = data_root(cfg)
        title = cls.title
        tv = getattr(tvd, cls.torchvision_class)
        base = os.path.join(root, tv.base_folder)
        files = [f for f, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]
        missing = [f for f in files if not os.path.isfile(os.path.join(base, f))]

        if missing and cfg["download"]:
            try:
                download_and_extract_archive(tv.url, root, filename=tv.filename, md5=tv.tgz_md5)
            except Exception as e:  # URLError, OSError, RuntimeError (md5 of the archive), tarfile errors
                raise download_error(title, root, e, f"fetch {tv.url} yourself and extract it into {root}") from None
            missing = [f for f in files if not os.path.isfile(os.path.join(base, f))]
        if missing:
            if len(missing) == len(files):
                why = (
                    f"no {title} batches in {base}; put the python version of {title} there "
                    f"(extract {tv.filename} into {root}) or run with dataset.download=true"
                )
            else:
                why = (
                    f"{title} folder {base} is incomplete (missing {', '.join(missing)}); "
                    f"extract {tv.filename} into {root} again or run with dataset.download=true"
                )
            raise UserError("dataset.root", why)

        if cfg["check_md5"]:
            bad = [f for f, md5 in tv.train_list + tv.test_list if not check_integrity(os.path.join(base, f), md5)]
            if not check_integrity(os.path.join(base, tv.meta["filename"]), tv.meta["md5"]):
                bad.append(tv.meta["filename"])
            if bad:
                raise UserError(
                    "dataset.root",
                    f"the {title} files in {base} do not match torchvision's md5 sums "
                    f"(corrupted or not the official python version); extract {tv.filename} into {root} "
                    "again, or set dataset.check_md5=false to load them as they are",
                )
        fix = f"extract {tv.filename} into {root} again"
        try:
            x_tr, y_tr = _split(base, [f for f, _ in tv.train_list], fix)
            x_te, y_te = _split(base, [f for f, _ in tv.test_list], fix)
        except (
            KeyError,
            ValueError,
            TypeError,
        ) as e:  # batches of another shape or content
            raise UserError(
                "dataset.root",
                f"cannot read the {title} batches in {base} ({brief(e)}); {fix}",
            ) from None
        return Raw(x_tr, y_tr, x_te, y_te, cls.num_classes, cls.mean, cls.std)


def _split(base: str, files: list[str], fix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, 32, 32] images and int64 [N] labels of the batch ``files`` (rows of 1024 red, green, blue);
    a file that is no CIFAR batch is one line naming it, ``fix`` saying what to do."""
    entries = []
    for name in files:
        path = os.path.join(base, name)
        try:
            entries.append(read_batch(path))
        except Exception as e:  # a refused global, a truncated or foreign file
            raise UserError("dataset.root", f"cannot read {path} ({brief(e)}); {fix}") from None
    data = np.concatenate([np.asarray(e["data"], dtype=np.uint8) for e in entries]).reshape(-1, 3, 32, 32)
    labels = [y for e in entries for y in (e["labels"] if "labels" in e else e["fine_labels"])]
    return torch.from_numpy(np.ascontiguousarray(data)), torch.as_tensor(np.asarray(labels, dtype=np.int64))


@DATASETS.register("cifar10")
class Cifar10(_Cifar):
    """CIFAR-10: 10 classes."""

    options = dataset_options(
        CHECK_MD5,
        pad=4,
        flip=True,
        docs={
            "root": "folder that holds cifar-10-batches-py/ (env PRUNE_CLI_DATA, else ./data)",
            "download": "fetch cifar-10-python.tar.gz into root when the batches are missing (needs the network)",
        },
    )
    torchvision_class, title, num_classes = "CIFAR10", "CIFAR-10", 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@DATASETS.register("cifar100")
class Cifar100(_Cifar):
    """CIFAR-100: 100 fine classes (train, test and meta files)."""

    options = dataset_options(
        CHECK_MD5,
        pad=4,
        flip=True,
        docs={
            "root": "folder that holds cifar-100-python/ (env PRUNE_CLI_DATA, else ./data)",
            "download": "fetch cifar-100-python.tar.gz into root when the files are missing (needs the network)",
        },
    )
    torchvision_class, title, num_classes = "CIFAR100", "CIFAR-100", 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
