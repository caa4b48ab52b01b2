"""TinyImageNet-200: the unzipped tiny-imagenet-200/ folder of JPEGs, decoded once into a cache.

100,000 train RGB images of 64x64 in 200 classes; the labelled val split (10,000) is our test split.
Classes are the sorted wnids. The decoded tensors are saved to ``tiny-imagenet-200/prune_cli_cache.pt``
together with a signature of the folder's file lists and annotations; a cache whose signature no
longer matches is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from PIL import Image

from prune_cli.core.errors import UserError
from prune_cli.data.files import data_root, decode_images, download_error
from prune_cli.data.spec import DATASETS, DatasetSpec, Raw, dataset_options

log = logging.getLogger(__package__)  # log lines keep the name "prune_cli.data" they always had

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_FOLDER = "tiny-imagenet-200"
TINY_CACHE = "prune_cli_cache.pt"
REFETCH = "replace it with the original file (unzip tiny-imagenet-200.zip again)"
TINY_CACHE_VERSION = 1  # part of the signature: raise it when the cache's content changes


def _index(base: str):
    """(sorted wnids, train files per class, val (file, class) list, signature) of the folder."""

    def malformed(why: str) -> UserError:
        return UserError(
            "dataset.root", f"malformed TinyImageNet-200 folder {base}: {why}; unzip tiny-imagenet-200.zip there again"
        )

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


@DATASETS.register("tinyimagenet200")
class TinyImageNet200(DatasetSpec):
    """TinyImageNet-200 through its cache; classes and image size come from the folder."""

    options = dataset_options(
        pad=4,
        flip=True,
        docs={
            "root": "folder that holds tiny-imagenet-200/ (env PRUNE_CLI_DATA, else ./data); "
            "decoded once into tiny-imagenet-200/prune_cli_cache.pt",
            "download": "fetch and unzip tiny-imagenet-200.zip (~240 MB) into root when missing (needs the network)",
        },
    )
    shape, num_classes = (3, 64, 64), 200  # the official files; describe() looks at the folder when present
    mean, std = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)

    @classmethod
    def describe(cls, cfg: dict) -> tuple[tuple[int, int, int], int]:
        """From a folder that is present (wnids.txt and one image), else the official 64x64x200."""
        try:
            base = os.path.join(data_root(cfg), TINY_FOLDER)
            with open(os.path.join(base, "wnids.txt")) as f:
                wnids = sorted({line.strip() for line in f if line.strip()})
            folder = os.path.join(base, "train", wnids[0], "images")
            first = min(f for f in os.listdir(folder) if f.lower().endswith((".jpeg", ".jpg")))
            with Image.open(os.path.join(folder, first)) as img:
                w, h = img.size
            return (3, h, w), len(wnids)
        except (OSError, IndexError, ValueError, UserError):
            return cls.shape, cls.num_classes  # not there (yet): load_data will say what is wrong

    @classmethod
    def read(cls, cfg: dict) -> Raw:
        root = data_root(cfg)
        base = os.path.join(root, TINY_FOLDER)
        if not os.path.isdir(base) and cfg["download"]:
            from torchvision.datasets.utils import download_and_extract_archive

            try:
                download_and_extract_archive(TINY_URL, download_root=root, md5=TINY_ZIP_MD5)
            except Exception as e:
                raise download_error(
                    "TinyImageNet-200", root, e, f"fetch {TINY_URL} yourself and unzip it into {root}"
                ) from None
        if not os.path.isdir(base):
            raise UserError(
                "dataset.root",
                f"no TinyImageNet-200 folder {base}; unzip tiny-imagenet-200.zip "
                f"({TINY_URL}) into {root} or run with dataset.download=true",
            )

        wnids, train, val, signature = _index(base)
        cache = os.path.join(base, TINY_CACHE)
        if os.path.isfile(cache):
            try:
                blob = torch.load(cache, map_location="cpu", weights_only=True, mmap=True)
                if blob.get("signature") == signature:
                    return cls._raw(blob, len(wnids))
                log.info("TinyImageNet: %s is stale, decoding the JPEGs again", cache)
            except Exception as e:  # truncated or foreign file: rebuild it
                log.warning("TinyImageNet: ignoring unreadable cache %s (%s)", cache, e)

        log.info("TinyImageNet: decoding %d JPEGs once (cached in %s)", sum(map(len, train)) + len(val), cache)
        train_paths = [p for files in train for p in files]
        blob = {
            "signature": signature,
            "wnids": wnids,
            "train_x": torch.from_numpy(decode_images(train_paths, fix=REFETCH)),
            "train_y": torch.tensor([k for k, files in enumerate(train) for _ in files], dtype=torch.int64),
            "test_x": torch.from_numpy(decode_images([p for p, _ in val], fix=REFETCH)),
            "test_y": torch.tensor([k for _, k in val], dtype=torch.int64),
        }
        tmp = f"{cache}.tmp.{os.getpid()}"
        try:  # write then rename: a crash never leaves a half-written cache under the real name
            torch.save(blob, tmp)
            os.replace(tmp, cache)
        except OSError as e:  # read-only data folder: work without a cache
            log.warning(
                "TinyImageNet: could not write the cache %s (%s); the JPEGs will be decoded again next time", cache, e
            )
            try:
                os.remove(tmp)
            except OSError:
                pass
        return cls._raw(blob, len(wnids))

    @classmethod
    def _raw(cls, blob: dict, num_classes: int) -> Raw:
        return Raw(blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], num_classes, cls.mean, cls.std)
