"""model=torchvision and model=custom: networks prune_cli did not write run through the pipeline, pruned through
their traced graph, and are stored as factory + kept channels that rebuild into the same network."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from helpers import TINY, run_cli
from helpers import compose_config as config
from prune_cli.core.checkpoint import load_checkpoint
from prune_cli.core.errors import UserError
from prune_cli.core.trust import trusting
from prune_cli.models import build_model
from prune_cli.models.graphnet import graph_groups
from prune_cli.run import pipeline
from prune_cli.structure.graph import ChannelGraph

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    """A user's network: two conv-BN-ReLU layers, a residual pair, a linear head."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.c3, self.b3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(x)))
        h = h + self.b3(self.c3(h))
        return self.fc(h.mean((2, 3)))
'''


@pytest.mark.slow
def test_torchvision_resnet18_prunes_and_its_checkpoint_rebuilds(tmp_path):
    cfg = config(
        *TINY,
        "model=torchvision",
        "model.network=resnet18",
        "schedule.pretrain.epochs=1",
        "schedule.finetune.epochs=1",
        "prune.ratio=0.4",
        "prune.residual=false",  # the simple groups only (auto: every group of the graph)
    )
    rows = pipeline.run(cfg, tmp_path)
    assert [r["stage"] for r in rows] == ["init", "pretrain", "prune", "finetune"]
    assert abs(1 - rows[2]["params"] / rows[1]["params"] - 0.4) < 0.01
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert list(layers["layer"]) == [f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in (0, 1)]  # blocks' insides
    # the stored pruned network = the pretrained factory network with the same channels removed by the graph
    pre, pruned_ck = (load_checkpoint(tmp_path / "checkpoints" / f"{s}.pt") for s in ("pretrain", "prune"))
    dense = build_model(pre["arch"])
    dense.load_state_dict(pre["state_dict"])
    graph = ChannelGraph(dense.net, torch.zeros(2, 3, 16, 16))
    removed = set()
    for (_, order), keep in zip(graph_groups(graph), pruned_ck["keep"]):
        removed |= {c for c, k in zip(order, keep.tolist()) if not k}
    expect = graph.pruned(removed).eval()
    rebuilt = build_model(pruned_ck["arch"]).eval()
    rebuilt.load_state_dict(pruned_ck["state_dict"])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), expect(x), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_network_from_the_users_own_file(tmp_path):
    (tmp_path / "my_net.py").write_text(NET)
    r = run_cli(
        *TINY,
        "model=custom",
        "model.target=my_net:Net",
        "+model.kwargs.width=6",
        "prune.ratio=0.2",
        "schedule.pretrain.epochs=1",
        "schedule.finetune.epochs=1",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    layers = pd.read_csv(tmp_path / "run" / "layers.csv")
    assert list(layers["layer"]) == ["c1", "c2"]  # prune.residual=auto: c2's channels are c3's too, pruned as one
    assert (layers["after"] < layers["before"]).all()


def test_the_users_residual_stream_prunes_with_prune_residual(tmp_path, monkeypatch):
    (tmp_path / "my_net.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    run = [*TINY, "model=custom", "model.target=my_net:Net", "+model.kwargs.width=6", "prune.residual=true"]
    rows = pipeline.run(
        config(*run, "prune.ratio=0.3", "schedule.pretrain.epochs=1", "schedule.finetune.epochs=1"), tmp_path / "run"
    )
    layers = pd.read_csv(tmp_path / "run" / "layers.csv")
    assert list(layers["layer"]) == ["c1", "c2"]  # c2's channels are c3's too: the stream, pruned as one
    assert (layers["after"] < layers["before"]).all()
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "finetune.pt")
    with trusting(["my_net:Net"]):  # the user's own factory, as the run's model.target trusted it
        model = build_model(final["arch"])  # the factory network, then the graph removes the same channels again
    model.load_state_dict(final["state_dict"])
    assert [g.width(dict(model.named_modules())) for g in model.channel_groups()] == list(layers["after"])
    assert sum(p.numel() for p in model.parameters()) == rows[-1]["params"]


@pytest.mark.parametrize(
    "overrides,option",
    [
        (["model=torchvision", "model.network=nonet"], "model.network"),
        (["model=torchvision", "dataset=digits"], "model.network"),  # 1-channel images
        (["model=custom", "model.target=no_such_module:Net"], "model.target"),
        (["model=custom", "model.target=no_colon"], "model.target"),
    ],
)
def test_refusals_are_one_line(tmp_path, overrides, option):
    base = [o for o in TINY if not o.startswith("dataset")] if "dataset=digits" in overrides else TINY
    with pytest.raises(UserError) as e:
        pipeline.run(config(*base, *overrides), tmp_path)
    assert e.value.option == option and "\n" not in str(e.value)


GATED = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))  # a zeroed channel stays zero: offered
        x = torch.sigmoid(self.bn_b(self.b(x)))  # sigmoid(0) = 0.5: masking b's BN is not removing: not offered
        return self.fc(self.c(x).mean((2, 3)))
"""


def test_a_group_whose_zero_does_not_stay_zero_is_not_offered(tmp_path, monkeypatch):
    (tmp_path / "gated_net.py").write_text(GATED)
    monkeypatch.chdir(tmp_path)
    with trusting(["gated_net:Net"]):
        model = build_model({"name": "custom", "target": "gated_net:Net", "num_classes": 10, "in_channels": 3})
    assert [g.name for g in model.channel_groups()] == ["a", "c"]  # c has no BatchNorm: its output is the mask


def test_neuron_merging_refuses_a_network_with_other_activations(tmp_path, monkeypatch):
    (tmp_path / "silu_net.py").write_text(NET.replace("torch.relu", "torch.nn.functional.silu"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        pipeline.run(config(*TINY, "model=custom", "model.target=silu_net:Net", "schedule=merge"), tmp_path / "run")
    assert e.value.option == "schedule.stages" and "SiLU" in e.value.why
