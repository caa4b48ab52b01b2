"""Networks whose training-mode output is a named tuple of logits (GoogLeNet's, Inception's): the main logits are
the first, and the auxiliary heads' cross-entropy is added to the training loss with ``model.aux_weight``;
evaluation reads the main logits alone. The run prunes such a network and trains it in both modes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from helpers import TINY
from helpers import compose_config as config
from prune_cli.core.checkpoint import load_checkpoint
from prune_cli.core.trust import trusting
from prune_cli.models import build_model
from prune_cli.run import pipeline

NET = '''
from collections import namedtuple

import torch
from torch import nn

Outputs = namedtuple("Outputs", ["logits", "aux_logits"])


class Net(nn.Module):
    """Two conv-BN-ReLU layers and a head; an auxiliary head on the first layer's output, run in training only."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.aux = nn.Linear(8, num_classes)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        logits = self.fc(torch.relu(self.b2(self.c2(x))).mean((2, 3)))
        if self.training:
            return Outputs(logits, self.aux(x.mean((2, 3))))
        return logits
'''


@pytest.fixture
def aux_net(tmp_path, monkeypatch):
    (tmp_path / "aux_net.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return ["model=custom", "model.target=aux_net:Net"]


@pytest.mark.parametrize("weight, expect", [(None, 0.3), (0.5, 0.5)])
def test_the_main_logits_are_read_and_the_heads_weighted(aux_net, weight, expect):
    arch = {"name": "custom", "target": "aux_net:Net", "num_classes": 10, "in_channels": 3, "image_size": 8}
    with trusting(["aux_net:Net"]):
        model = build_model({**arch, "aux_weight": weight}).train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    logits = model(x)
    by_hand = model.net.train()(x)  # the same batch statistics: BatchNorm in training mode normalises by the batch
    torch.testing.assert_close(logits, by_hand.logits)
    torch.testing.assert_close(model.aux_loss(y), expect * F.cross_entropy(by_hand.aux_logits, y))
    assert model.aux_loss(y) is None  # read once: a step's heads are not added twice
    model.eval()
    assert model(x).shape == (4, 10) and model.aux_loss(y) is None


def test_a_run_prunes_and_trains_a_network_with_training_only_heads(aux_net, tmp_path):
    cfg = config(*TINY, *aux_net, "prune.ratio=0.3", "schedule.pretrain.epochs=1", "schedule.finetune.epochs=1")
    rows = pipeline.run(cfg, tmp_path / "run")
    assert [r["stage"] for r in rows] == ["init", "pretrain", "prune", "finetune"]
    layers = pd.read_csv(tmp_path / "run" / "layers.csv")
    assert set(layers["layer"]) == {"c1", "c2"} and (layers["after"] < layers["before"]).all()
    with trusting(["aux_net:Net"]):
        model = build_model(load_checkpoint(tmp_path / "run" / "checkpoints" / "finetune.pt")["arch"])
    assert model.net.aux.in_features == int(layers.set_index("layer").loc["c1", "after"])  # the head was sliced
