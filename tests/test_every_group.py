"""One notion of groups everywhere: a network without BatchNorm is pruned at its convs' outputs, ``prune.residual``
defaults to ``auto`` (every group of the graph for traced networks), a refusal names the option that would reach
the ratio, an old run resumes as it ran, and sparse training regularizes the groups the prune stage prunes."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from helpers import TINY
from helpers import compose_config as config
from prune_cli.core.checkpoint import load_checkpoint
from prune_cli.core.errors import UserError
from prune_cli.core.trust import trusting
from prune_cli.importance.regularizers import build_regularizer
from prune_cli.methods.hgsr import loss_greedy_select
from prune_cli.models import build_model, with_shared_groups
from prune_cli.run import pipeline
from prune_cli.stages.train import SparseTrain
from prune_cli.structure.channels import mask_channels, structure

PLAIN = '''
import torch
from torch import nn


class Net(nn.Module):
    """No BatchNorm: convs with bias and ReLU, a BN-free residual pair, a linear head."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3), nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        h = h + torch.relu(self.c3(h))
        return self.fc(h.mean((2, 3)))
'''

STREAM = '''
import torch
from torch import nn


class Net(nn.Module):
    """c2 and c3 write one residual stream: only every group of the graph reaches a large ratio."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(x)))
        h = h + self.b3(self.c3(h))
        return self.fc(h.mean((2, 3)))
'''

PRETRAIN = ["schedule.stages=[pretrain,prune]", "schedule.pretrain.epochs=1"]


@pytest.fixture
def user_nets(tmp_path, monkeypatch):
    """The users' files in the folder the command starts from."""
    (tmp_path / "plain_net.py").write_text(PLAIN)
    (tmp_path / "stream_net.py").write_text(STREAM)
    monkeypatch.chdir(tmp_path)
    with trusting(["plain_net:Net", "stream_net:Net"]):
        yield tmp_path


def hand_count(widths: dict[str, int], classes: int = 10, size: int = 16) -> tuple[int, int]:
    """(params, MACs) of PLAIN with these output widths, from its layers' shapes (c2 is 3x3 without padding)."""
    a, b = widths["c1"], widths["c2"]
    inner = size - 2
    params = (3 * 9 + 1) * a + (a * 9 + 1) * b + (b + 1) * b + (b + 1) * classes
    macs = 3 * 9 * a * size**2 + a * 9 * b * inner**2 + b * b * inner**2 + b * classes
    return params, macs


def test_a_network_without_batchnorm_is_pruned_at_its_convs_outputs(user_nets):
    run = [*TINY, "model=custom", "model.target=plain_net:Net", *PRETRAIN, "prune.ratio=0.4"]
    rows = pipeline.run(config(*run), user_nets / "run")
    layers = pd.read_csv(user_nets / "run" / "layers.csv")
    assert list(layers["layer"]) == ["c1", "c2"]  # auto: c2 with c3 is the BN-free stream, one group
    assert (layers["after"] < layers["before"]).all()
    pre, pruned_ck = (load_checkpoint(user_nets / "run" / "checkpoints" / f"{s}.pt") for s in ("pretrain", "prune"))
    dense = build_model(pre["arch"])
    dense.load_state_dict(pre["state_dict"])
    pruned = build_model(pruned_ck["arch"])
    pruned.load_state_dict(pruned_ck["state_dict"])
    masked = with_shared_groups(copy.deepcopy(dense), (3, 16, 16))  # the groups the prune stage pruned
    mask_channels(masked, pruned_ck["keep"])
    x = torch.randn(6, 3, 16, 16)
    for mode in (True, False):
        with torch.no_grad():
            torch.testing.assert_close(pruned.train(mode)(x), masked.train(mode)(x), atol=1e-5, rtol=1e-4)
    widths = dict(zip(layers["layer"], layers["after"]))
    assert (widths["c1"], widths["c2"]) == (pruned.net.c1.out_channels, pruned.net.c3.out_channels)
    assert (rows[-1]["params"], rows[-1]["macs"]) == hand_count(widths)
    assert (rows[0]["params"], rows[0]["macs"]) == hand_count({"c1": 8, "c2": 6})


def test_bn_scale_refuses_a_group_without_batchnorm_before_any_data(user_nets):
    run = [*TINY, "model=custom", "model.target=plain_net:Net", *PRETRAIN, "criterion=bn_scale"]
    with pytest.raises(UserError) as e:
        pipeline.run(config(*run), user_nets / "run")
    assert e.value.option == "criterion.name"
    assert e.value.why.startswith("bn_scale needs a BatchNorm after every pruned conv; c1 has none")
    assert not (user_nets / "run" / "checkpoints").exists()


def test_a_ratio_only_every_group_reaches_names_prune_residual(user_nets, command):
    net = ["model=custom", "model.target=stream_net:Net", "prune.ratio=0.8", "hydra.run.dir=run"]
    r = command(*TINY, *net, "prune.residual=false")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: prune.ratio: 0.8 of the params cannot be removed")
    assert "with the groups of prune.residual=false; prune.residual=true offers every group" in line
    assert line.endswith(": would reach it)")


def test_an_old_run_recorded_with_residual_false_resumes_so(user_nets):
    run = [*TINY, "model=custom", "model.target=stream_net:Net", *PRETRAIN, "prune.ratio=0.1"]
    first = pipeline.run(config(*run, "prune.residual=false"), user_nets / "run")
    (user_nets / "run" / "checkpoints" / "prune.pt").unlink()  # the run stopped before pruning
    again = pipeline.run(config(*run), user_nets / "run")  # the same command, now with the default auto
    assert pd.read_csv(user_nets / "run" / "layers.csv")["layer"].tolist() == ["c1"]  # the default groups, as before
    assert [r["params"] for r in again] == [r["params"] for r in first]
    assert load_checkpoint(user_nets / "run" / "checkpoints" / "prune.pt")["config"]["prune"]["residual"] is False
    pipeline.run(config(*run), user_nets / "fresh")
    assert pd.read_csv(user_nets / "fresh" / "layers.csv")["layer"].tolist() == ["c1", "c2"]


def test_sparse_training_regularizes_the_groups_the_prune_stage_prunes(user_nets):
    cfg = config(*TINY, "model=custom", "model.target=stream_net:Net", "schedule=sparse", "regularizer=group_lasso")
    cfg.regularizer.layers = "prunable"
    model = build_model({"name": "custom", "target": "stream_net:Net", "num_classes": 10, "in_channels": 3})
    ctx = SimpleNamespace(cfg=cfg, input_shape=(3, 16, 16))
    penalty = SparseTrain().loss_terms(model, ctx).value()
    expected = 0.0  # every layer holding a group's channels (c3 and fc hold only the stream's), each once
    for layer in (model.net.c1, model.net.c2, model.net.c3, model.net.fc):
        w = layer.weight.detach().double()
        expected += sum(float(w[:, i].norm()) for i in range(w.shape[1]))
    assert penalty == pytest.approx(cfg.regularizer.lam * expected, rel=1e-5)
    cfg.prune.residual = False  # the prune stage then prunes c1 only: c1 and its consumer c2 are regularized
    penalty = SparseTrain().loss_terms(model, ctx).value()
    expected = sum(
        float(w[:, i].norm())
        for w in (model.net.c1.weight.detach(), model.net.c2.weight.detach())
        for i in range(w.shape[1])
    )
    assert penalty == pytest.approx(cfg.regularizer.lam * expected, rel=1e-5)


def test_the_loss_greedy_and_swp_work_without_batchnorm(user_nets):
    """The loss greedy's Taylor pre-screen reads a BN-free stream at its producers' outputs; SWP zeroes a dead
    filter's bias where there is no BatchNorm to zero (its output is then 0, as removal makes it)."""
    with trusting(["plain_net:Net"]):
        model = build_model({"name": "custom", "target": "plain_net:Net", "num_classes": 10, "in_channels": 3})
    shared = with_shared_groups(model, (3, 16, 16))
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    keep, stats = loss_greedy_select(
        shared, x, y, structure=structure(shared, (3, 16, 16)), target="channels", ratio=0.5, prescreen=2
    )
    assert sum(int(k.sum()) for k in keep) == 7 and stats["backward_passes"] > 0  # 14 channels, 7 removed
    swp = build_regularizer({"name": "swp"}, model)
    with torch.no_grad():
        model.net.c1.skeleton[2] = 0.0
    swp.before_step()
    assert model.net.c1.bias[2] == 0 and (model.net.c1.bias[[0, 1, 3]] != 0).all()
