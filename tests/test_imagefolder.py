"""dataset=imagefolder: a tiny folder of PNGs in torchvision's layout, read, resized, normalised and run, in memory
and streamed from the files (the same batches, results and errors)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import TINY
from helpers import compose_config as config
from prune_cli.core.errors import UserError
from prune_cli.data import batches, describe, imagefolder, load_data, stream
from prune_cli.data.spec import channel_stats, chunked_channel_stats
from prune_cli.data.stream import StreamedImages
from prune_cli.run import pipeline

CLASSES = ("cat", "dog", "eel")

# DataLoader worker processes (their start-up is slow: the case with them is an end-to-end one)
WORKER_PROCESSES = pytest.param(2, marks=pytest.mark.slow)


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


def folder_config(root, *overrides):
    return config("dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=8", *overrides).dataset


@pytest.mark.parametrize("workers", [0, WORKER_PROCESSES])
def test_streamed_batches_equal_in_memory_ones(tmp_path, workers):
    make_folder(tmp_path)
    options = ("dataset.pad=2", "dataset.flip=true", "dataset.val_split=3", f"dataset.workers={workers}")
    memory = load_data(folder_config(tmp_path, *options, "dataset.stream=never"), seed=0, device="cpu")
    streamed = load_data(folder_config(tmp_path, *options, "dataset.stream=always"), seed=0, device="cpu")
    assert isinstance(memory.train.x, torch.Tensor) and isinstance(streamed.train.x, StreamedImages)
    assert streamed.input_shape == memory.input_shape and streamed.train.x.device == torch.device("cpu")
    assert torch.equal(streamed.mean, memory.mean) and torch.equal(streamed.std, memory.std)
    for split in ("train", "val", "test"):  # the same images behind the same indices (val_split subsets both)
        a, b = getattr(memory, split), getattr(streamed, split)
        idx = torch.randperm(len(a), generator=torch.Generator().manual_seed(1))
        assert torch.equal(b.take(idx), a.take(idx)) and torch.equal(b.y, a.y)
    for split, size, train in (("train", 4, True), ("train", 4, False), ("test", 3, False)):
        a, b = (
            list(batches(getattr(d, split), d, size, generator=torch.Generator().manual_seed(7), train=train))
            for d in (memory, streamed)
        )
        assert len(a) == len(b) == -(-len(memory.train if split == "train" else memory.test) // size)
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    global_rng = torch.get_rng_state()  # (the DataLoader must not draw from it: unseeded code reads it)
    a, b = (list(batches(d.test, d, 3)) for d in (memory, streamed))  # evaluation: no generator, file order
    assert len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert torch.equal(torch.get_rng_state(), global_rng)


def test_auto_streams_what_does_not_fit_and_never_refuses_it(tmp_path, monkeypatch):
    make_folder(tmp_path)
    assert isinstance(load_data(folder_config(tmp_path), seed=0, device="cpu").train.x, torch.Tensor)
    monkeypatch.setattr(imagefolder, "_available_memory", lambda: 2 * 16 * 3 * 8 * 8 - 2)  # 1 byte short
    assert isinstance(load_data(folder_config(tmp_path), seed=0, device="cpu").train.x, StreamedImages)
    with pytest.raises(UserError) as e:
        load_data(folder_config(tmp_path, "dataset.stream=never"), seed=0, device="cpu")
    assert e.value.option == "dataset.image_size" and "half the free memory" in str(e.value)


@pytest.mark.parametrize("workers", [0, WORKER_PROCESSES])
def test_a_file_that_cannot_be_decoded_while_streaming_is_one_line(tmp_path, workers):
    make_folder(tmp_path)
    data = load_data(folder_config(tmp_path, "dataset.stream=always", f"dataset.workers={workers}"), 0, "cpu")
    bad = tmp_path / "train" / "dog" / "1.png"
    bad.write_bytes(b"not a png")  # damaged after the statistics pass: met by the batches
    with pytest.raises(UserError) as e:
        list(batches(data.train, data, 4, generator=torch.Generator().manual_seed(0)))
    assert e.value.option == "dataset.root" and "\n" not in str(e.value)
    assert e.value.why.startswith(f"cannot decode {bad} (") and e.value.why.endswith("; replace or remove the file")


def test_streamed_statistics_equal_those_of_the_decoded_images(tmp_path, monkeypatch):
    make_folder(tmp_path)
    for channels in (3, 1):
        cfg = folder_config(tmp_path, f"dataset.channels={channels}", "dataset.stream=always")
        images = load_data(cfg, seed=0, device="cpu").train.x
        monkeypatch.setattr(stream, "CHUNK_BYTES", channels * 8 * 8 * 5)  # 12 images in chunks of 5, 5 and 2
        assert [len(chunk) for chunk in images.chunks()] == [5, 5, 2]
        mean, std = chunked_channel_stats(images.chunks())
        want_mean, want_std = channel_stats(images.decode())
        assert len(mean) == channels and np.allclose(mean, want_mean, rtol=0, atol=1e-12)
        assert np.allclose(std, want_std, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_a_streamed_run_gives_the_in_memory_results(tmp_path):
    make_folder(tmp_path / "images")
    results = {}
    for mode in ("never", "always"):
        pipeline.run(
            config(
                *[o for o in TINY if not o.startswith("dataset")],
                "dataset=imagefolder",
                f"dataset.root={tmp_path / 'images'}",
                "dataset.image_size=8",
                "dataset.pad=1",
                "dataset.flip=true",
                f"dataset.stream={mode}",
                "model.width_mult=0.25",
                "schedule.pretrain.epochs=1",
                "schedule.finetune.epochs=1",
                "trainer.batch_size=5",
            ),
            tmp_path / mode,
        )
        results[mode] = pd.read_csv(tmp_path / mode / "results.csv")[["stage", "top1", "loss", "params"]]
    pd.testing.assert_frame_equal(results["always"], results["never"], check_exact=True)
