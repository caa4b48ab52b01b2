"""CIFAR-10 and CIFAR-100: the "python version" batches, read with torchvision's loaders.

50,000 train / 10,000 test RGB images of 32x32 with 10 or 100 (fine) classes. torchvision checks
the files against the official md5 sums unless ``dataset.check_md5=false`` (re-packed copies).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool
from prune_cli.data.files import brief, data_root, download_error
from prune_cli.data.spec import DATASETS, DatasetSpec, Raw, dataset_options

CHECK_MD5 = Bool(
    "check_md5", True, "verify the batch files against torchvision's md5 sums; false loads re-packed copies as they are"
)


def _without_md5(base: type) -> type:
    """A subclass of torchvision's CIFAR class whose file checks test existence instead of md5."""
    return type(
        base.__name__,
        (base,),
        {
            "train_list": [[f, None] for f, _ in base.train_list],
            "test_list": [[f, None] for f, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        },
    )


class _Cifar(DatasetSpec):
    """Both CIFARs: they differ only in torchvision class, title, classes and statistics."""

    torchvision_class = ""  # name in torchvision.datasets
    title = ""  # as messages spell it
    shape = (3, 32, 32)
    mean: tuple[float, ...] = ()  # the published per-channel statistics
    std: tuple[float, ...] = ()

    @classmethod
    def read(cls, cfg: dict) -> Raw:
        import torchvision.datasets as tvd

        root = data_root(cfg)
        title = cls.title
        tv = getattr(tvd, cls.torchvision_class)
        if not cfg["check_md5"]:
            tv = _without_md5(tv)
        base = os.path.join(root, tv.base_folder)
        files = [f for f, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]
        missing = [f for f in files if not os.path.isfile(os.path.join(base, f))]

        if missing and cfg["download"]:
            try:
                tv(root, train=True, download=True)
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

        try:
            train = tv(root, train=True, download=False)
            test = tv(root, train=False, download=False)
        except Exception as e:
            if cfg["check_md5"] and isinstance(e, RuntimeError) and "corrupted" in str(e):
                raise UserError(
                    "dataset.root",
                    f"the {title} files in {base} do not match torchvision's md5 sums "
                    f"(corrupted or not the official python version); extract {tv.filename} into {root} "
                    "again, or set dataset.check_md5=false to load them as they are",
                ) from None
            # unpickling / reshape errors of a malformed file
            raise UserError(
                "dataset.root",
                f"cannot read the {title} batches in {base} ({brief(e)}); extract {tv.filename} into {root} again",
            ) from None

        def tensors(ds):
            x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            return x, torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))

        x_tr, y_tr = tensors(train)
        x_te, y_te = tensors(test)
        return Raw(x_tr, y_tr, x_te, y_te, cls.num_classes, cls.mean, cls.std)


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
