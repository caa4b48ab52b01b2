"""Your own images: ``dataset=imagefolder dataset.root=DIR``, torchvision's ImageFolder layout.

``DIR/<train_dir>/<class>/*.png|jpg|...`` and ``DIR/<test_dir>/<class>/...``; classes are the sorted
sub-folder names of the train folder (the test folder may lack some, not add others). Every image is
converted to ``channels`` (3: RGB, 1: grey) and resized to ``image_size`` x ``image_size``. A folder that
fits in half the free memory is decoded once per run and kept as uint8 tensors on the device like every
other dataset; a larger one (or any, with ``stream=always``) is streamed: each batch is decoded from the
files by a DataLoader with ``workers`` processes. Both give the same batches for the same seed (the same
order and the same augmentation). Normalisation: ``mean`` / ``std`` as given, or (null) the train images'
own per-channel statistics.
"""

from __future__ import annotations

import os

import torch

from prune_cli.core.errors import UserError
from prune_cli.core.options import Choice, Int, List, Str, Value
from prune_cli.data.files import data_root, decode_images
from prune_cli.data.spec import DATASETS, DatasetSpec, Raw, channel_stats, chunked_channel_stats, dataset_options
from prune_cli.data.stream import StreamedImages

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
FIX = "replace or remove the file"


def _stats_rule(value) -> str | None:
    return None if value is None or len(value) in (1, 3) else f"one value per channel; got {len(value)}"


@DATASETS.register("imagefolder")
class ImageFolder(DatasetSpec):
    options = dataset_options(
        Str("train_dir", "train", "the training images' folder under root, one sub-folder per class"),
        Str("test_dir", "val", "the test images' folder under root (the same class names)"),
        Int("image_size", 32, "every image is resized to image_size x image_size (bilinear)", lo=1),
        Choice("channels", 3, (3, 1), "3: RGB, 1: greyscale"),
        List(
            "mean",
            None,
            "per-channel mean in 0..1 pixel units; null = the train images' own",
            item=Value("float"),
            nullable=True,
            rule=_stats_rule,
            rule_doc="null or one number per channel",
        ),
        List(
            "std",
            None,
            "per-channel std in 0..1 pixel units; null = the train images' own",
            item=Value("float", lo=0.0, lo_open=True),
            nullable=True,
            rule=_stats_rule,
            rule_doc="null or one number > 0 per channel",
        ),
        Choice(
            "stream",
            "auto",
            ("auto", "always", "never"),
            "decode each batch from the files, not all images up front (the same batches): auto = when the images "
            "would need over half the free memory; never = refuse a folder that does not fit",
        ),
        Int("workers", 2, "DataLoader worker processes decoding the files when streaming (0 = the main process)", lo=0),
        docs={
            "root": "folder holding train_dir and test_dir (env PRUNE_CLI_DATA, else ./data)",
            "download": "unused by imagefolder (kept so every dataset has the same keys)",
        },
    )

    @classmethod
    def _folders(cls, cfg: dict) -> tuple[str, str, list[str]]:
        root = data_root(cfg)
        train, test = os.path.join(root, cfg["train_dir"]), os.path.join(root, cfg["test_dir"])
        for option, folder in (("train_dir", train), ("test_dir", test)):
            if not os.path.isdir(folder):
                raise UserError(
                    f"dataset.{option}", f"no folder {folder} (expected <root>/<{option}>/<class>/<images>)"
                )
        classes = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
        if len(classes) < 2:
            raise UserError("dataset.train_dir", f"{train} holds {len(classes)} class folder(s); at least 2 are needed")
        extra = sorted(set(d for d in os.listdir(test) if os.path.isdir(os.path.join(test, d))) - set(classes))
        if extra:
            raise UserError("dataset.test_dir", f"{test} has classes the train folder lacks: {', '.join(extra[:5])}")
        return train, test, classes

    @classmethod
    def describe(cls, cfg: dict) -> tuple[tuple[int, int, int], int]:
        _, _, classes = cls._folders(cfg)
        return (cfg["channels"], cfg["image_size"], cfg["image_size"]), len(classes)

    @staticmethod
    def _files(folder: str, classes: list[str], option: str) -> tuple[list[str], list[int]]:
        paths, labels = [], []
        for k, name in enumerate(classes):
            sub = os.path.join(folder, name)
            if not os.path.isdir(sub):
                continue
            files = sorted(f for f in os.listdir(sub) if f.lower().endswith(EXTENSIONS))
            if not files:  # kept, the class would have no image to learn or test it by, and nothing would say so
                raise UserError(
                    "dataset.root",
                    f"class folder {sub} holds no image ({', '.join(EXTENSIONS)}); add its images or remove the folder",
                )
            paths += [os.path.join(sub, f) for f in files]
            labels += [k] * len(files)
        if not paths:
            raise UserError(
                f"dataset.{option}", f"no images ({', '.join(EXTENSIONS)}) in the class folders of {folder}"
            )
        return paths, labels

    @staticmethod
    def _streams(cfg: dict, n: int) -> bool:
        """Whether ``n`` images are streamed from their files (``stream``); refuses ``stream=never`` when they would
        need more than half the free memory."""
        c, size = cfg["channels"], cfg["image_size"]
        need, free = n * c * size * size, _available_memory()
        too_large = free is not None and need > free // 2
        if too_large and cfg["stream"] == "never":
            raise UserError(
                "dataset.image_size",
                f"{n} images of {c}x{size}x{size} need {need / 2**30:.1f} GiB, more than half the free memory "
                f"({free / 2**30:.1f} GiB); use a smaller image_size, a subset of the folders or dataset.stream=auto",
            )
        return cfg["stream"] == "always" or (cfg["stream"] == "auto" and too_large)

    @classmethod
    def read(cls, cfg: dict) -> Raw:
        train, test, classes = cls._folders(cfg)
        (tr_paths, tr_y), (te_paths, te_y) = (
            cls._files(train, classes, "train_dir"),
            cls._files(test, classes, "test_dir"),
        )
        c, size = cfg["channels"], cfg["image_size"]
        mean, std = cfg["mean"], cfg["std"]
        for option, given in (("mean", mean), ("std", std)):
            if given is not None and len(given) != c:
                raise UserError(f"dataset.{option}", f"{len(given)} values for {c} channel(s)")
        mode = "RGB" if c == 3 else "L"
        if cls._streams(cfg, len(tr_paths) + len(te_paths)):
            x_train = StreamedImages(tuple(tr_paths), mode, size, FIX, cfg["workers"])
            x_test = StreamedImages(tuple(te_paths), mode, size, FIX, cfg["workers"])
        else:
            x_train = torch.from_numpy(decode_images(tr_paths, FIX, mode, size))
            x_test = torch.from_numpy(decode_images(te_paths, FIX, mode, size))
        if mean is None or std is None:
            own = (  # streamed: one pass over the train files, a chunk at a time
                channel_stats(x_train) if isinstance(x_train, torch.Tensor) else chunked_channel_stats(x_train.chunks())
            )
            mean, std = own[0] if mean is None else mean, own[1] if std is None else std
        return Raw(
            x_train,
            torch.tensor(tr_y, dtype=torch.int64),
            x_test,
            torch.tensor(te_y, dtype=torch.int64),
            len(classes),
            tuple(mean),
            tuple(std),
        )


def _available_memory() -> int | None:
    """Bytes of memory available now (None where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
