"""Data quirks made visible: the folder a dataset was read from when it is not ``dataset.root``, an empty class
folder, 16-bit images, and the fingerprint that identifies the data a run read."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fakedata
from helpers import TINY
from helpers import compose_config as config
from prune_cli.core.errors import UserError
from prune_cli.data import fashion_mnist, load_data
from prune_cli.data.files import decode_image
from prune_cli.run import pipeline


def digests(folder) -> dict[str, str]:
    """The sha256 of every file under ``folder`` (what must stay as it was)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def make_folder(root, classes=("a", "b"), n=2) -> None:
    """Random 8x8 RGB PNGs: ``n`` per class in train and in val."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def folder_cfg(root):
    return config("dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=8").dataset


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_class_folder_is_one_line_naming_it(tmp_path, split):
    make_folder(tmp_path)
    (tmp_path / split / "c").mkdir()
    if split == "val":  # a class of the train folder, empty in the test folder
        (tmp_path / "train" / "c").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / "c" / "0.png")
    before = digests(tmp_path)
    with pytest.raises(UserError) as e:
        load_data(folder_cfg(tmp_path), seed=0, device="cpu")
    assert e.value.option == "dataset.root" and "\n" not in str(e.value)
    assert f"class folder {tmp_path / split / 'c'} holds no image" in e.value.why
    assert digests(tmp_path) == before


@pytest.mark.slow
def test_the_command_exits_2_on_an_empty_class_folder(tmp_path, monkeypatch, command):
    make_folder(tmp_path / "images")
    (tmp_path / "images" / "train" / "c").mkdir()
    before = digests(tmp_path / "images")
    run = [o for o in TINY if not o.startswith("dataset")]
    monkeypatch.chdir(tmp_path)  # the run directory Hydra makes by default is the working directory's
    out = command(*run, "dataset=imagefolder", f"dataset.root={tmp_path / 'images'}", "dataset.image_size=8")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.strip() == (
        f"error: dataset.root: class folder {tmp_path / 'images' / 'train' / 'c'} holds no image "
        "(.png, .jpg, .jpeg, .bmp, .ppm, .pgm, .tif, .tiff, .webp); add its images or remove the folder"
    )
    assert digests(tmp_path / "images") == before


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path, mode):
    values = np.arange(0, 65536, 257 * 16, dtype=np.uint16).reshape(2, 8)  # 0, 4112, ... 61680: the 16-bit range
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # uint16: PIL mode I;16
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")  # a real 16-bit PNG, as PIL opens one
    before = path.read_bytes()
    decoded = decode_image(str(path), "replace it", mode)
    expect = (values >> 8).astype(np.uint8)
    assert decoded.dtype == np.uint8 and decoded.shape == (2, 8, 3 if mode == "RGB" else 1)
    for channel in range(decoded.shape[2]):
        np.testing.assert_array_equal(decoded[:, :, channel], expect)
    assert path.read_bytes() == before


def test_an_8_bit_png_decodes_as_before(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 4), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "grey.png"), "fix", "L")[:, :, 0], pixels)


def test_the_fingerprint_names_the_data_read(tmp_path):
    make_folder(tmp_path)
    first = load_data(folder_cfg(tmp_path), seed=0, device="cpu").fingerprint
    assert first == load_data(folder_cfg(tmp_path), seed=1, device="cpu").fingerprint  # the files, not the seed
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "val" / "b" / "1.png")
    assert load_data(folder_cfg(tmp_path), seed=0, device="cpu").fingerprint != first


@pytest.mark.slow
def test_fashion_mnist_read_from_the_fallback_folder_is_recorded_and_printed(tmp_path, monkeypatch, capsys):
    debian = tmp_path / "debian"
    fakedata.make_fashion_mnist(None, compressed=True, folder=debian)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", str(debian))
    (tmp_path / "empty").mkdir()
    before = digests(debian)
    overrides = [o for o in TINY if not o.startswith("dataset")]
    cfg = config(*overrides, "dataset=fashion_mnist", f"dataset.root={tmp_path / 'empty'}", "schedule=pretrain")
    cfg.schedule.pretrain.epochs = 1
    pipeline.run(cfg, tmp_path / "run")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dataset.root:")]
    assert printed == [f"dataset.root: {tmp_path / 'empty'} has no fashion_mnist files; read {debian}"]
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert recorded["root"] == str(tmp_path / "empty") and recorded["read"] == str(debian)
    ck = torch.load(tmp_path / "run" / "checkpoints" / "pretrain.pt", weights_only=True)
    assert ck["provenance"]["data"] == recorded and ck["data_fingerprint"] == recorded["fingerprint"]
    assert digests(debian) == before and not any((tmp_path / "empty").iterdir())
