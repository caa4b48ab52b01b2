"""``model.weights_path``: a local state_dict file loaded into the unpruned network before any data is read (saved
here from a random network: nothing can be downloaded). Another number of classes keeps the classifier's random
init, with a note; anything else that does not fit is one line naming the option."""

from __future__ import annotations

import pytest
import torch

from prune_cli.core.trust import trusting
from prune_cli.models import build_model

NET = """
from torch import nn


class Net(nn.Sequential):
    def __init__(self, num_classes=10, width=6):
        super().__init__(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
        )
"""


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """(arch of the user's network, a function saving a random instance's weights with the given kwargs)."""
    (tmp_path / "small_net.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    arch = {"name": "custom", "target": "small_net:Net", "num_classes": 10, "in_channels": 3, "image_size": 8}

    def save(**kwargs):
        with trusting(["small_net:Net"]):
            net = build_model({**arch, "kwargs": kwargs}).net
        torch.save(net.state_dict(), tmp_path / "w.pt")
        return net.state_dict()

    return arch, save


def test_the_file_is_the_network(saved):
    arch, save = saved
    weights = save()
    with trusting(["small_net:Net"]):
        model = build_model({**arch, "weights_path": "w.pt"})
    assert all(torch.equal(weights[k], v) for k, v in model.net.state_dict().items())


def test_another_number_of_classes_keeps_a_fresh_classifier(saved, capsys):
    arch, save = saved
    with trusting(["small_net:Net"]):
        weights = build_model({**arch, "num_classes": 5}).net.state_dict()  # a 5-class file for 10 classes
        torch.save(weights, "w.pt")
        model = build_model({**arch, "weights_path": "w.pt"})
    loaded = model.net.state_dict()
    assert all(torch.equal(weights[k], loaded[k]) for k in weights if not k.startswith("8."))
    assert loaded["8.weight"].shape == (10, 8)
    assert capsys.readouterr().err.strip() == (
        "note: model.weights_path: 8.bias, 8.weight hold another number of classes than 10: the classifier starts "
        "from random init"
    )


@pytest.mark.parametrize("content, why", [("width", "does not fit the network (RuntimeError: "), ("list", "is not")])
def test_a_file_that_does_not_fit_is_one_line_before_any_data(saved, command, tmp_path, content, why):
    _, save = saved
    if content == "width":
        save(width=4)
    else:
        torch.save([torch.zeros(3)], tmp_path / "w.pt")
    r = command(
        "model=custom",
        "model.target=small_net:Net",
        "model.weights_path=w.pt",
        "dataset=cifar10",
        f"dataset.root={tmp_path}/no_data",  # never read: the weights are refused first
        f"hydra.run.dir={tmp_path}/run",
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: model.weights_path: ") and why in r.stderr
