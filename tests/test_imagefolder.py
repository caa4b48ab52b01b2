"""dataset=imagefolder: a tiny folder of PNGs in torchvision's layout, read, resized, normalised and run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY
from helpers import compose_config as config
from prune_cli import pipeline
from prune_cli.data import describe, load_data
from prune_cli.errors import UserError

CLASSES = ("cat", "dog", "eel")


def make_folder(root, sizes=((10, 12), (8, 8))) -> None:
    """3 classes; train: 4 images each, val: 2 (one class missing from val); two sizes, random RGB PNGs."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for name in CLASSES:
            if split == "val" and name == "eel":
                continue
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                h, w = sizes[i % len(sizes)]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    (root / "train" / "notes.txt").write_text("not a class folder")


def test_reads_resizes_and_normalises(tmp_path):
    make_folder(tmp_path)
    cfg = config("dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.image_size=8").dataset
    assert describe(cfg) == ((3, 8, 8), 3)
    data = load_data(cfg, seed=0, device="cpu")
    assert data.train.x.shape == (12, 3, 8, 8) and data.test.x.shape == (4, 3, 8, 8)
    assert data.train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and data.test.y.tolist() == [0, 0, 1, 1]
    with Image.open(tmp_path / "train" / "dog" / "0.png") as img:  # PIL's bilinear resize, channels first
        expect = np.asarray(img.convert("RGB").resize((8, 8), Image.BILINEAR)).transpose(2, 0, 1)
    assert torch.equal(data.train.x[4], torch.from_numpy(expect.copy()))
    x = data.train.x.double() / 255  # the train images' own statistics
    torch.testing.assert_close(data.mean.double(), x.mean((0, 2, 3)), atol=1e-6, rtol=0)
    torch.testing.assert_close(data.std.double(), x.transpose(0, 1).reshape(3, -1).std(1), atol=1e-5, rtol=0)
    grey = load_data(
        config(
            "dataset=imagefolder",
            f"dataset.root={tmp_path}",
            "dataset.channels=1",
            "dataset.mean=[0.5]",
            "dataset.std=[0.25]",
        ).dataset,
        seed=0,
        device="cpu",
    )
    assert grey.train.x.shape == (12, 1, 32, 32) and grey.mean.tolist() == [0.5] and grey.std.tolist() == [0.25]


@pytest.mark.parametrize(
    "damage,option",
    [
        (lambda root: (root / "val" / "fox").mkdir(), "dataset.test_dir"),  # a class the train folder lacks
        (lambda root: (root / "train" / "cat" / "0.png").write_bytes(b"not a png"), "dataset.root"),
    ],
)
def test_bad_folders_are_one_line(tmp_path, damage, option):
    make_folder(tmp_path)
    damage(tmp_path)
    with pytest.raises(UserError) as e:
        load_data(config("dataset=imagefolder", f"dataset.root={tmp_path}").dataset, seed=0, device="cpu")
    assert e.value.option == option and "\n" not in str(e.value)
    with pytest.raises(UserError) as e:
        describe(config("dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.train_dir=nope").dataset)
    assert e.value.option == "dataset.train_dir"


def test_a_run_on_a_folder(tmp_path):
    make_folder(tmp_path / "images")
    rows = pipeline.run(
        config(
            *[o for o in TINY if not o.startswith("dataset")],
            "dataset=imagefolder",
            f"dataset.root={tmp_path / 'images'}",
            "dataset.image_size=8",
            "schedule.pretrain.epochs=1",
            "schedule.finetune.epochs=1",
        ),
        tmp_path / "run",
    )
    assert [r["stage"] for r in rows] == ["init", "pretrain", "prune", "finetune"]
