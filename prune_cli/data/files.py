"""Helpers the readers of on-disk datasets share: the data folder and one-line error texts.

Errors about files name ``dataset.root`` (or ``dataset.download`` for a failed download), say where
we looked, and say how to fix it, on one line.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from hydra.utils import to_absolute_path
from PIL import Image, UnidentifiedImageError

from prune_cli.core.errors import UserError


def data_root(cfg: dict) -> str:
    """``dataset.root`` as an absolute path: relative to where the user started the command."""
    root = cfg.get("root")
    if root is None or str(root).strip() == "":
        raise UserError(
            "dataset.root",
            "is empty; give the folder that holds the datasets (or set the PRUNE_CLI_DATA environment variable)",
        )
    root = os.path.expanduser(str(root))
    return to_absolute_path(root)  # Hydra's start folder (the process's own outside a Hydra app)


def brief(err: BaseException) -> str:
    """``Type: first line ... last line`` of the message, for one-line error messages."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(err).__name__}: {text[:300]}"


def download_error(what: str, root: str, err: BaseException, how: str) -> UserError:
    """The UserError for a failed download of ``what``; ``how`` says how to get the files by hand."""
    return UserError(
        "dataset.download",
        f"could not download {what} into {root} ({brief(err)}); {how}, then run with dataset.download=false",
    )


def decode_image(path: str, fix: str, mode: str = "RGB", size: int | None = None) -> np.ndarray:
    """uint8 [H, W, C] of one image file (PIL ``mode`` RGB: 3 channels, L: 1), resized to size x size (bilinear)
    unless ``size`` is None. A file that cannot be decoded is a UserError naming it, ``fix`` saying what to do."""
    try:
        with Image.open(path) as img:
            img = eight_bit(img).convert(mode)
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img)
            return arr[:, :, None] if arr.ndim == 2 else arr
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as e:
        raise UserError("dataset.root", f"cannot decode {path} ({brief(e)}); {fix}") from None


def eight_bit(img: Image.Image) -> Image.Image:
    """``img`` with 16-bit grey values (PIL modes I;16*, and I as 16-bit PNGs open) scaled to 8 bits (value >> 8):
    PIL's own conversion clips them at 255, which turns almost every pixel white."""
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    values = np.asarray(img).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")


def decode_images(paths: list[str], fix: str, mode: str = "RGB", size: int | None = None) -> np.ndarray:
    """uint8 [N, C, H, W] of the image files (``decode_image`` of each), decoded in threads.

    ``size``: every image resized to size x size (bilinear); None: all must share the first one's size."""
    first = decode_image(paths[0], fix, mode, size)
    out = np.empty((len(paths), first.shape[2], *first.shape[:2]), dtype=np.uint8)

    def fill(i: int) -> None:
        arr = first if i == 0 else decode_image(paths[i], fix, mode, size)
        if arr.shape != first.shape:
            raise UserError(
                "dataset.root",
                f"{paths[i]} is {arr.shape[1]}x{arr.shape[0]}, not {first.shape[1]}x{first.shape[0]} like the other "
                "images",
            )
        out[i] = arr.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(fill, range(len(paths)), chunksize=256))
    return out
