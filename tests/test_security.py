"""A file is data: nothing a dataset file or a checkpoint names is imported or called unless the user allowed it."""

import os
import pickle

import pytest
import torch

import fakedata
import prune_cli
from helpers import TINY
from prune_cli import data as D
from prune_cli.cli import export as export_cli
from prune_cli.core.errors import UserError
from prune_cli.core.trust import trusted, trusting
from prune_cli.models import build_model


class _RunsACommand:
    """What a crafted pickle holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_batch_runs_no_code(tmp_path):
    root = tmp_path / "data"
    fakedata.make_cifar10(root, n_train=20, n_test=10)
    marker = tmp_path / "ran"
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": _RunsACommand(marker), "labels": [0]}, protocol=2))
    with pytest.raises(UserError) as e:  # md5 unchecked: the one way torchvision's loader would have unpickled it
        D.load_data(fakedata.cifar_cfg("cifar10", root), seed=0, device="cpu")
    assert e.value.option == "dataset.root"
    assert e.value.why.startswith(f"cannot read {batch} (UnpicklingError: ")
    assert "system is not part of a CIFAR batch" in e.value.why
    assert not marker.exists()


NET = """
from torch import nn


def Net(num_classes=10, in_channels=3):
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes),
    )
"""


def _checkpoint(path, target: str, state_dict=None):
    """A finished stage's checkpoint of a ``model=custom`` network made by ``target`` (tensors only: it passes
    ``weights_only=True``, as a crafted one would)."""
    ck = {"schema": 2, "stage": "finetune", "done": True, "arch": _arch(target), "state_dict": state_dict or {}}
    config = {"dataset": {"name": "synthetic", "image_size": 16}}
    torch.save({**ck, "config": config, "rows": [], "histories": {}}, path)
    return path


@pytest.mark.slow
def test_a_checkpoint_naming_a_target_runs_nothing_unless_trusted(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    monkeypatch.chdir(tmp_path)
    ck = _checkpoint(tmp_path / "evil.pt", "os:system")
    with pytest.raises(UserError) as e:
        prune_cli.load(ck)
    assert "model.target: the checkpoint names the factory os:system" in e.value.why
    assert "model.target=os:system" in e.value.why and "--trust os:system" in e.value.why
    assert "trust=['os:system']" in e.value.why
    capsys.readouterr()
    assert export_cli.main([str(ck)]) == 2  # the export command's entry point, in this process
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--trust os:system" in err
    assert not marker.exists() and not list(tmp_path.glob("model.*"))


def test_a_trusted_target_loads_and_only_while_trusted(tmp_path, monkeypatch):
    (tmp_path / "sec_net.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    with trusting(["sec_net:Net"]):
        state = build_model(_arch("sec_net:Net")).state_dict()
    ck = _checkpoint(tmp_path / "own.pt", "sec_net:Net", state)
    model, meta = prune_cli.load(ck, trust=["sec_net:Net"])
    assert meta["params"] == sum(p.numel() for p in model.parameters())
    assert not trusted("sec_net:Net")  # the trust lasted the call


@pytest.mark.slow
def test_init_from_a_checkpoint_of_another_target_is_refused_before_data(tmp_path, monkeypatch, command):
    (tmp_path / "sec_net.py").write_text(NET)
    ck = _checkpoint(tmp_path / "evil.pt", "os:system")
    monkeypatch.chdir(tmp_path)  # where the user runs the command: sec_net.py and the relative run directory
    r = command(*TINY, "model=custom", "model.target=sec_net:Net", f"init_from={ck}", "hydra.run.dir=run")
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: init_from: {ck}") and "model.target=os:system" in line
    assert not (tmp_path / "run" / "results.csv").exists()


def _arch(target: str) -> dict:
    return {"name": "custom", "target": target, "num_classes": 10, "in_channels": 3, "image_size": 8}


@pytest.mark.slow
def test_init_from_a_plain_state_dict_says_so(tmp_path, monkeypatch, command):
    torch.save(build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3}).state_dict(), tmp_path / "sd.pt")
    monkeypatch.chdir(tmp_path)
    r = command(*TINY, f"init_from={tmp_path / 'sd.pt'}", "hydra.run.dir=run")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"error: init_from: {tmp_path / 'sd.pt'} holds a plain state_dict (tensors by name, no architecture); "
        "init_from takes a checkpoint prune_cli wrote: a run's checkpoints/<stage>.pt"
    )
