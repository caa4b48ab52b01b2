"""prune_cli.data: loaders read exactly what was written, splits, augmentation, batching, errors, declarations."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import fakedata
from prune_cli import data as D
from prune_cli.core.errors import UserError
from prune_cli.core.options import check_block, defaults
from prune_cli.core.seeds import numpy_rng
from prune_cli.data import container, fashion_mnist, tinyimagenet
from prune_cli.data.spec import DatasetSpec

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
COMMON = ("name", "root", "download", "subset", "test_subset", "val_split", "pad", "flip")


def synth(**kw):
    cfg = {
        "name": "synthetic",
        "root": "unused",
        "download": False,
        "channels": 3,
        "image_size": 8,
        "num_classes": 4,
        "train_size": 200,
        "test_size": 80,
        "subset": None,
        "test_subset": None,
        "val_split": 0,
        "pad": 0,
        "flip": False,
    }
    cfg.update(kw)
    return cfg


def rows(x: torch.Tensor) -> list[bytes]:
    return sorted(r.tobytes() for r in x.reshape(len(x), -1).cpu().numpy())


def assert_split(split, x, y, device="cpu"):
    assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
    assert split.x.device == torch.device(device) and split.y.device == torch.device(device)
    assert len(split) == len(y)
    assert torch.equal(split.x.cpu(), x) and torch.equal(split.y.cpu(), y)


def one_line(err: UserError) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- CIFAR


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    return root, fakedata.make_cifar10(root, n_train=100, n_test=40)


def test_cifar10_roundtrip(cifar10_root):
    root, fake = cifar10_root
    d = D.load_data(OmegaConf.create(fakedata.cifar_cfg("cifar10", root)), seed=0, device=torch.device("cpu"))
    assert d.name == "cifar10" and d.num_classes == 10 and d.input_shape == (3, 32, 32)
    assert (d.pad, d.flip, d.val) == (4, True, None)
    assert_split(d.train, fake.x_train, fake.y_train)
    assert_split(d.test, fake.x_test, fake.y_test)
    assert d.mean.dtype == torch.float32 and d.mean.shape == (3,) and d.std.shape == (3,)
    assert torch.allclose(d.mean, torch.tensor([0.4914, 0.4822, 0.4465]))


def test_cifar100_roundtrip(tmp_path):
    fake = fakedata.make_cifar100(tmp_path, n_train=300, n_test=200)
    d = D.load_data(fakedata.cifar_cfg("cifar100", tmp_path), seed=0, device="cpu")
    assert d.num_classes == 100 and d.input_shape == (3, 32, 32)
    assert_split(d.train, fake.x_train, fake.y_train)
    assert_split(d.test, fake.x_test, fake.y_test)


def test_fake_cifar_is_python2_pickle(cifar10_root):
    import pickle

    root, fake = cifar10_root
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (40, 3072)
    # rows are 1024 red, 1024 green, 1024 blue values, each 32x32 row-major
    assert np.array_equal(entry[b"data"].reshape(40, 3, 32, 32), fake.x_test.numpy())


def test_cifar_md5_check_rejects_unofficial_files(cifar10_root):
    root, _ = cifar10_root
    with pytest.raises(UserError) as e:
        D.load_data(fakedata.cifar_cfg("cifar10", root, check_md5=True), seed=0, device="cpu")
    msg = one_line(e.value)
    assert e.value.option == "dataset.root"
    assert "md5" in msg and "dataset.check_md5=false" in msg and str(root / "cifar-10-batches-py") in msg


def test_cifar_missing_names_option_and_path(tmp_path):
    for name, folder in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")):
        with pytest.raises(UserError) as e:
            D.load_data(fakedata.cifar_cfg(name, tmp_path / "nothing"), seed=0, device="cpu")
        msg = one_line(e.value)
        assert msg.startswith("dataset.root: ")
        assert str(tmp_path / "nothing" / folder) in msg and "dataset.download=true" in msg


def test_cifar_incomplete_and_malformed(tmp_path):
    fakedata.make_cifar10(tmp_path, n_train=20, n_test=10)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(UserError) as e:
        D.load_data(fakedata.cifar_cfg("cifar10", tmp_path), seed=0, device="cpu")
    assert e.value.option == "dataset.root" and "cannot read" in one_line(e.value)
    (folder / "data_batch_3").unlink()
    with pytest.raises(UserError) as e:
        D.load_data(fakedata.cifar_cfg("cifar10", tmp_path), seed=0, device="cpu")
    assert "data_batch_3" in one_line(e.value) and str(folder) in str(e.value)


@pytest.mark.parametrize(
    "name,module,expect",
    [
        ("cifar10", "torchvision.datasets.cifar", "cifar-10-python.tar.gz"),
        ("cifar100", "torchvision.datasets.cifar", "cifar-100-python.tar.gz"),
        ("fashion_mnist", "torchvision.datasets.mnist", "-ubyte.gz"),
        ("tinyimagenet200", "torchvision.datasets.utils", "tiny-imagenet-200.zip"),
    ],
)
def test_failed_download_is_a_user_error(tmp_path, monkeypatch, name, module, expect):
    import importlib

    def offline(*args, **kwargs):  # what urllib raises here: no network
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(importlib.import_module(module), "download_and_extract_archive", offline)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    with pytest.raises(UserError) as e:
        D.load_data({"name": name, "root": str(tmp_path), "download": True}, seed=0, device="cpu")
    msg = one_line(e.value)
    assert e.value.option == "dataset.download" and str(tmp_path) in msg and expect in msg


# --------------------------------------------------------------------------- TinyImageNet


def tiny_cfg(root, **kw):
    return fakedata.dataset_cfg("tinyimagenet200", root, **kw)


def test_tinyimagenet_roundtrip_and_cache(tmp_path, monkeypatch):
    fake = fakedata.make_tinyimagenet(tmp_path, n_classes=3, n_train_per_class=4, n_val_per_class=2, size=16)
    d = D.load_data(tiny_cfg(tmp_path), seed=0, device="cpu")
    assert d.num_classes == 3 and d.input_shape == (3, 16, 16)
    assert_split(d.train, fake.x_train, fake.y_train)
    assert_split(d.test, fake.x_test, fake.y_test)
    # the grayscale JPEG became 3 equal channels
    assert torch.equal(d.train.x[0, 0], d.train.x[0, 1]) and torch.equal(d.train.x[0, 0], d.train.x[0, 2])
    cache = tmp_path / "tiny-imagenet-200" / tinyimagenet.TINY_CACHE
    assert cache.is_file() and not list(cache.parent.glob("*.tmp.*"))

    def no_decoding(paths):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(tinyimagenet, "decode_images", no_decoding)
    again = D.load_data(tiny_cfg(tmp_path), seed=0, device="cpu")
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.y, d.test.y)

    # a changed folder makes the cache stale: drop one val image from the annotations
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text("".join(ann.read_text().splitlines(keepends=True)[:-1]))
    monkeypatch.undo()
    fewer = D.load_data(tiny_cfg(tmp_path), seed=0, device="cpu")
    assert_split(fewer.test, fake.x_test[:-1], fake.y_test[:-1])


def test_tinyimagenet_missing_and_malformed(tmp_path):
    with pytest.raises(UserError) as e:
        D.load_data(tiny_cfg(tmp_path), seed=0, device="cpu")
    msg = one_line(e.value)
    assert e.value.option == "dataset.root" and str(tmp_path / "tiny-imagenet-200") in msg
    assert "tiny-imagenet-200.zip" in msg and "dataset.download=true" in msg

    fakedata.make_tinyimagenet(tmp_path, n_classes=2, n_train_per_class=1, n_val_per_class=1, size=8)
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_99.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(UserError) as e:
        D.load_data(tiny_cfg(tmp_path), seed=0, device="cpu")
    assert "malformed" in one_line(e.value) and "val_annotations.txt" in str(e.value)
    ann.write_text("".join(ann.read_text().splitlines(keepends=True)[:-1]))
    (tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_0.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(UserError) as e:
        D.load_data(tiny_cfg(tmp_path), seed=0, device="cpu")
    assert "cannot decode" in one_line(e.value) and "val_0.JPEG" in str(e.value)
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").unlink()
    with pytest.raises(UserError) as e:
        D.load_data(tiny_cfg(tmp_path), seed=0, device="cpu")
    assert "wnids.txt" in one_line(e.value)


# --------------------------------------------------------------------------- Fashion-MNIST


def fm_cfg(root, **kw):
    cfg = {
        "name": "fashion_mnist",
        "root": str(root),
        "download": False,
        "subset": None,
        "test_subset": None,
        "val_split": 0,
        "pad": 2,
        "flip": True,
    }
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("compressed", [False, True])
def test_fashion_mnist_roundtrip(tmp_path, monkeypatch, compressed):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    fake = fakedata.make_fashion_mnist(tmp_path, n_train=60, n_test=20, compressed=compressed)
    d = D.load_data(fm_cfg(tmp_path), seed=0, device="cpu")
    assert d.num_classes == 10 and d.input_shape == (1, 28, 28) and d.mean.shape == (1,)
    assert_split(d.train, fake.x_train, fake.y_train)
    assert_split(d.test, fake.x_test, fake.y_test)
    assert sorted(os.listdir(tmp_path / "FashionMNIST" / "raw")) == sorted(
        f + (".gz" if compressed else "") for f in fashion_mnist.FILES
    )  # nothing written into root


def test_fashion_mnist_debian_fallback_and_missing(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", str(debian))
    with pytest.raises(UserError) as e:
        D.load_data(fm_cfg(tmp_path / "data"), seed=0, device="cpu")
    msg = one_line(e.value)
    assert msg.startswith("dataset.root: ") and str(tmp_path / "data" / "FashionMNIST" / "raw") in msg
    assert "dataset-fashion-mnist" in msg and "dataset.download=true" in msg
    fake = fakedata.make_fashion_mnist(tmp_path, n_train=30, n_test=10, compressed=True, folder=debian)
    d = D.load_data(fm_cfg(tmp_path / "data"), seed=0, device="cpu")
    assert_split(d.train, fake.x_train, fake.y_train)
    assert_split(d.test, fake.x_test, fake.y_test)


def test_fashion_mnist_truncated_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    fakedata.make_fashion_mnist(tmp_path, n_train=10, n_test=10)
    images = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])
    with pytest.raises(UserError) as e:
        D.load_data(fm_cfg(tmp_path), seed=0, device="cpu")
    assert e.value.option == "dataset.root" and "cannot read" in one_line(e.value)


# --------------------------------------------------------------------------- digits, synthetic


def test_digits():
    d = D.load_data({"name": "digits", "root": "unused"}, seed=0, device="cpu")
    assert len(d.train) + len(d.test) == 1797 and len(d.test) == 359
    assert d.num_classes == 10 and d.input_shape == (1, 8, 8) and (d.pad, d.flip) == (1, False)
    assert int(d.train.x.max()) == 255 and int(d.train.x.min()) == 0
    assert set(d.train.y.tolist()) == set(range(10)) == set(d.test.y.tolist())
    # the split is stratified and fixed: the run seed does not change it
    other = D.load_data({"name": "digits", "root": "unused"}, seed=123, device="cpu")
    assert torch.equal(other.test.x, d.test.x) and torch.equal(other.train.y, d.train.y)
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target)
    assert np.all(np.abs(d.test.y.bincount().numpy() - counts * 359 / 1797) < 1)
    assert np.allclose(d.mean.numpy(), d.train.x.float().div(255).mean().item(), atol=1e-6)


def test_synthetic_defaults_deterministic_and_learnable():
    cfg = OmegaConf.load(CONF / "synthetic.yaml")
    d = D.load_data(cfg, seed=0, device="cpu")
    assert (len(d.train), len(d.test), d.num_classes, d.input_shape) == (512, 256, 10, (3, 32, 32))
    assert (d.pad, d.flip) == (0, False)
    again = D.load_data(cfg, seed=99, device="cpu")
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.y, d.test.y)
    # nearest class mean on train classifies the test images well
    xtr, xte = d.train.x.float().flatten(1), d.test.x.float().flatten(1)
    means = torch.stack([xtr[d.train.y == k].mean(0) for k in range(10)])
    acc = (torch.cdist(xte, means).argmin(1) == d.test.y).float().mean().item()
    assert acc > 0.9


# --------------------------------------------------------------------------- subsets, val split


def test_stratified_indices_exact_proportional_deterministic():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)[
        torch.randperm(100, generator=torch.Generator().manual_seed(0))
    ]
    for n in (1, 7, 33, 64, 100):
        idx = D.stratified_indices(y, n, numpy_rng(5, 1))
        assert len(idx) == n and len(set(idx.tolist())) == n and torch.equal(idx, idx.sort().values)
        got = torch.bincount(y[idx], minlength=4).numpy()
        want = n * np.array([50, 30, 15, 5]) / 100
        assert np.all(np.abs(got - want) < 1), (n, got, want)
        assert torch.equal(idx, D.stratified_indices(y, n, numpy_rng(5, 1)))
    assert not torch.equal(D.stratified_indices(y, 33, numpy_rng(5, 1)), D.stratified_indices(y, 33, numpy_rng(6, 1)))


def test_subset_in_load_data():
    full = D.load_data(synth(), seed=0, device="cpu")
    a = D.load_data(synth(subset=50, test_subset=20), seed=1, device="cpu")
    b = D.load_data(synth(subset=50, test_subset=20), seed=1, device="cpu")
    c = D.load_data(synth(subset=50, test_subset=20), seed=2, device="cpu")
    assert len(a.train) == 50 and len(a.test) == 20
    assert a.train.y.bincount(minlength=4).tolist() == [13, 13, 12, 12]  # 200 balanced -> 50
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert torch.equal(a.test.x, c.test.x)  # test_subset does not depend on the run seed
    assert set(rows(a.train.x)) <= set(rows(full.train.x))


@pytest.mark.parametrize("val_split,n_val", [(40, 40), (0.25, 50)])
def test_val_split_disjoint_and_stratified(val_split, n_val):
    full = D.load_data(synth(), seed=3, device="cpu")
    d = D.load_data(synth(val_split=val_split), seed=3, device="cpu")
    assert len(d.val) == n_val and len(d.train) == 200 - n_val
    assert np.all(np.abs(d.val.y.bincount(minlength=4).numpy() - n_val / 4) < 1)  # 200 balanced
    train_rows, val_rows = rows(d.train.x), rows(d.val.x)
    assert not set(train_rows) & set(val_rows)
    assert sorted(train_rows + val_rows) == rows(full.train.x)  # together: exactly the train split


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("subset", 201, "201 is larger than the 200-image train split of synthetic; use at most 200 or null"),
        ("test_subset", 81, "81 is larger than the 80-image test split of synthetic; use at most 80 or null"),
        ("val_split", 200, "holding out 200 images leaves none of the 200 train images of synthetic for training"),
        ("val_split", 0.999, "holding out 200 images leaves none"),
        ("pad", 8, "8 is not smaller than the 8x8 images of synthetic"),
        ("name", "imagenet", "unknown dataset 'imagenet'"),
    ],
)
def test_invalid_for_the_data(key, value, fragment):
    """What load_data checks itself: the name, and (after the read) what only the data can tell."""
    with pytest.raises(UserError) as e:
        D.load_data(synth(**{key: value}), seed=0, device="cpu")
    assert e.value.option == f"dataset.{key}"
    assert fragment in one_line(e.value)


@pytest.mark.parametrize(
    "name,key,value,fragment",
    [
        ("synthetic", "subset", 0, ">= 1 or null"),
        ("synthetic", "subset", -5, ">= 1"),
        ("synthetic", "subset", 1.5, "an integer"),
        ("synthetic", "subset", True, "an integer"),
        ("synthetic", "test_subset", 0, ">= 1 or null"),
        ("synthetic", "val_split", 1.0, "[0, 1)"),
        ("synthetic", "val_split", -0.1, "[0, 1)"),
        ("synthetic", "val_split", -3, ">= 0"),
        ("synthetic", "val_split", "x", "count"),
        ("synthetic", "val_split", True, "count"),
        ("synthetic", "val_split", float("nan"), "count"),
        ("synthetic", "pad", -1, ">= 0"),
        ("synthetic", "pad", 1.0, "an integer"),
        ("synthetic", "pad", None, "null"),
        ("synthetic", "flip", "yes", "true or false"),
        ("synthetic", "download", 1, "true or false"),
        ("synthetic", "num_classes", 0, ">= 2"),
        ("synthetic", "num_classes", 1, ">= 2"),
        ("synthetic", "channels", 0, ">= 1"),
        ("synthetic", "image_size", 2.5, "an integer"),
        ("synthetic", "train_size", 0, ">= 1"),
        ("synthetic", "test_size", -1, ">= 1"),
        ("synthetic", "bogus", 1, "unknown option"),
        ("digits", "channels", 3, "unknown option"),
        ("cifar10", "check_md5", "no", "true or false"),
        ("cifar100", "root", 5, "a string"),
    ],
)
def test_invalid_values_by_declaration(name, key, value, fragment):
    """Type and range of single values: the declarations say, checked before anything is read."""
    block = {k: v for k, v in synth(**{key: value}).items() if k != "name"} if name == "synthetic" else {key: value}
    with pytest.raises(UserError) as e:
        check_block(block, D.DATASETS.get(name).options, "dataset")
    assert e.value.option == f"dataset.{key}"
    assert fragment in one_line(e.value)
    # load_data checks the same declarations for direct callers (scripts, tests) before reading
    with pytest.raises(UserError) as e:
        D.load_data({"name": name, **block}, seed=0, device="cpu")
    assert e.value.option == f"dataset.{key}"


@pytest.mark.parametrize("value", [0, 0.0, None, 5, 0.5, 0.0001])
def test_valid_val_split_values(value):
    check_block({"val_split": value}, D.DATASETS.get("synthetic").options, "dataset")
    d = D.load_data(synth(val_split=value), seed=0, device="cpu")
    assert len(d.val or ()) == {0: 0, None: 0, 5: 5, 0.5: 100, 0.0001: 1}[value]  # a fraction holds out >= 1


# --------------------------------------------------------------------------- augment, normalize, batches


def rand_images(b=16, c=3, h=9, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, c, h, w), generator=g, dtype=torch.uint8)  # no zeros: padding shows


def test_augment_identity_and_determinism():
    x = rand_images()
    assert torch.equal(D.augment(x, 0, False, torch.Generator().manual_seed(0)), x)
    a = D.augment(x, 3, True, torch.Generator().manual_seed(7))
    b = D.augment(x, 3, True, torch.Generator().manual_seed(7))
    c = D.augment(x, 3, True, torch.Generator().manual_seed(8))
    assert a.dtype == torch.uint8 and a.shape == x.shape and a.device == x.device
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_flip_only():
    x = rand_images(b=64)
    out = D.augment(x, 0, True, torch.Generator().manual_seed(1))
    _, _, flipped = container.augment_params(64, 0, True, torch.Generator().manual_seed(1), x.device)
    for i in range(64):
        assert torch.equal(out[i], x[i].flip(-1) if flipped[i] else x[i])
    assert 16 < int(flipped.sum()) < 48


@pytest.mark.parametrize("pad,flip", [(2, False), (3, True), (1, True)])
def test_augment_matches_per_sample_reference(pad, flip):
    x = rand_images(b=32)
    out = D.augment(x, pad, flip, torch.Generator().manual_seed(11))
    dy, dx, flipped = container.augment_params(32, pad, flip, torch.Generator().manual_seed(11), x.device)
    h, w = x.shape[2:]
    windows_seen = set()
    for i in range(32):
        padded = F.pad(x[i], (pad, pad, pad, pad))
        ref = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        ref = ref.flip(-1) if flipped[i] else ref
        assert torch.equal(out[i], ref), i
        # independently: the output is one of the translated windows of the padded image
        matches = [
            (oy, ox, f)
            for oy in range(2 * pad + 1)
            for ox in range(2 * pad + 1)
            for f in (False, True)
            if torch.equal(
                out[i], padded[:, oy : oy + h, ox : ox + w].flip(-1) if f else padded[:, oy : oy + h, ox : ox + w]
            )
        ]
        assert matches and (flip or not any(f for _, _, f in matches))
        windows_seen.add((int(dy[i]), int(dx[i])))
        # zeros exactly where padding shows
        zero = out[i] == 0
        assert int(zero.sum()) == 3 * (h * w - (h - abs(int(dy[i]) - pad)) * (w - abs(int(dx[i]) - pad)))
    assert len(windows_seen) > 5


def test_normalize():
    d = D.load_data(synth(), seed=0, device="cpu")
    x = d.train.x[:10]
    want = (x.float() / 255 - d.mean[None, :, None, None]) / d.std[None, :, None, None]
    got = D.normalize(x, d)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)


def test_batches_cover_each_index_once():
    d = D.load_data(synth(pad=2, flip=True), seed=0, device="cpu")
    n = 37
    split = D.Split(d.train.x[:n], torch.arange(n))  # label = index, to track coverage
    plain = list(D.batches(split, d, 10))
    assert [len(y) for _, y in plain] == [10, 10, 10, 7]
    assert torch.equal(torch.cat([y for _, y in plain]), torch.arange(n))
    assert torch.allclose(torch.cat([x for x, _ in plain]), D.normalize(split.x, d))
    seen = []
    for epoch in range(2):
        ys = torch.cat(
            [y for _, y in D.batches(split, d, 8, generator=torch.Generator().manual_seed(epoch), train=True)]
        )
        assert sorted(ys.tolist()) == list(range(n))
        seen.append(ys)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], torch.arange(n))
    a = [x for x, _ in D.batches(split, d, 8, generator=torch.Generator().manual_seed(4), train=True)]
    b = [x for x, _ in D.batches(split, d, 8, generator=torch.Generator().manual_seed(4), train=True)]
    e = [x for x, _ in D.batches(split, d, 8, generator=torch.Generator().manual_seed(4), train=False)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, e))  # train=True augments
    # without a generator: fixed order, augmentation from torch's global RNG
    ys = torch.cat([y for _, y in D.batches(split, d, 16, train=True)])
    assert torch.equal(ys, torch.arange(n))


# --------------------------------------------------------------------------- config files


def test_yaml_files_have_common_keys_with_comments(monkeypatch, tmp_path):
    names = sorted(p.stem for p in CONF.glob("*.yaml"))
    assert names == D.DATASETS.names()
    monkeypatch.setenv("PRUNE_CLI_DATA", str(tmp_path))
    for name in names:
        text = (CONF / f"{name}.yaml").read_text()
        for line in text.splitlines():
            if re.match(r"^\w+:", line):
                assert "#" in line, f"{name}.yaml: no comment on {line!r}"
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        assert cfg.name == name and all(k in cfg for k in COMMON), name
        assert cfg.root == str(tmp_path) and cfg.download is False and cfg.val_split == 0
    monkeypatch.delenv("PRUNE_CLI_DATA")
    assert OmegaConf.load(CONF / "cifar10.yaml").root == "data"


def test_specs_declare_exactly_the_yaml_keys_and_defaults(monkeypatch):
    monkeypatch.delenv("PRUNE_CLI_DATA", raising=False)  # root's YAML value is then the declared "data"
    for name, spec in D.DATASETS.items():
        assert issubclass(spec, DatasetSpec) and spec.name == name
        yaml = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)
        del yaml["name"]
        declared = defaults(spec.options)
        assert list(declared) == list(yaml), name  # same keys, in the YAML's order
        assert all(declared[k] == v and type(declared[k]) is type(v) for k, v in yaml.items()), name
        assert all(o.doc and "\n" not in o.doc for o in spec.options), name
        assert check_block(yaml, spec.options, "dataset", fill=False) == yaml


def test_defaults_when_keys_missing():
    d = D.load_data({"name": "synthetic", "train_size": 20, "test_size": 10, "image_size": 8}, seed=0, device="cpu")
    assert (d.pad, d.flip, len(d.train), d.input_shape) == (0, False, 20, (3, 8, 8))


def test_describe_matches_load_data(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    fakedata.make_cifar10(tmp_path, n_train=10, n_test=10)
    fakedata.make_cifar100(tmp_path, n_train=10, n_test=10)
    fakedata.make_fashion_mnist(tmp_path, n_train=10, n_test=10)
    fakedata.make_tinyimagenet(tmp_path, n_classes=2, n_train_per_class=2, n_val_per_class=1, size=12)
    cfgs = [
        fakedata.cifar_cfg("cifar10", tmp_path),
        fakedata.cifar_cfg("cifar100", tmp_path),
        fm_cfg(tmp_path),
        tiny_cfg(tmp_path),
        {"name": "digits"},
        synth(channels=2, image_size=6, num_classes=3),
    ]
    for cfg in cfgs:
        d = D.load_data(cfg, seed=0, device="cpu")
        assert D.describe(cfg) == (d.input_shape, d.num_classes), cfg["name"]
    assert D.describe(tiny_cfg(tmp_path / "absent")) == ((3, 64, 64), 200)
    with pytest.raises(UserError):
        D.describe({"name": "mnist"})
