"""prune.residual=true: the residual streams of ResNets (block outputs, shortcuts, the next stage's input) are
channel groups too, for option-A (zero-padding) and option-B (projection) shortcuts: masked == pruned, exact
counts, a pruned network that rebuilds from its arch, and the pipeline's run."""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from helpers import TINY, calibrated, compose_config
from prune_cli.core.checkpoint import load_checkpoint
from prune_cli.core.errors import UserError
from prune_cli.core.trust import trusting
from prune_cli.importance.criteria import Sample, build_criterion
from prune_cli.models import build_model, with_shared_groups
from prune_cli.run import pipeline
from prune_cli.structure.channels import mask_channels, prune_channels, structure
from prune_cli.structure.counting import count_macs, count_params

SHAPE = (3, 32, 32)


def layer_count(model: torch.nn.Module, shape) -> tuple[int, int]:
    """(params, MACs) by explicit loops over the layers' shapes: every parameter's elements; every conv's
    out x in / groups x kh x kw x output pixels, every linear's out x in (output sizes from one forward)."""
    pixels = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: pixels.__setitem__(n, o.shape[2] * o.shape[3]))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    params = sum(int(np.prod(p.shape)) for p in model.parameters())
    macs = 0
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            macs += m.out_channels * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] * pixels[n]
        elif isinstance(m, torch.nn.Linear):
            macs += m.out_features * m.in_features
    return params, macs


@pytest.mark.slow
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet56_streams_pruned_to_half_the_params(shortcut):
    dense = calibrated(
        build_model({"name": "resnet56", "num_classes": 10, "in_channels": 3, "shortcut": shortcut}), SHAPE
    )
    model = with_shared_groups(dense, SHAPE)
    groups = model.channel_groups()
    streams = [g for g in groups if g.shared]
    # option A: the stem's channels run through all three stages, and each later stage pads in channels of its own;
    # option B: one stream per stage, its projection shortcut among the producers
    assert len(streams) == 3 and len(groups) == 27 + 3
    prune = OmegaConf.to_container(compose_config("prune.ratio=0.5").prune)
    keep, _, _ = build_criterion({"name": "l1"}).choose(model, structure(model, SHAPE), None, prune, 0.5, set())
    assert all(not k.all() for g, k in zip(groups, keep) if g.shared)  # every stream loses channels

    pruned = prune_channels(model, keep).eval()
    mask_channels(model, keep)
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(x), pruned(x)
    assert ((expected - got).abs().max() / expected.abs().max()) <= 1e-4

    params, macs = layer_count(pruned, SHAPE)
    assert (params, macs) == (count_params(pruned), count_macs(pruned, SHAPE))
    assert (params, macs) == structure(model, SHAPE).count([int(k.sum()) for k in keep])
    assert abs(1 - params / count_params(dense) - 0.5) <= 0.001 * 0.5 + 1e-9  # prune.tolerance, relative
    # stored as the network's own arch + the kept channels per group: it rebuilds, nothing pickled
    rebuilt = build_model(pruned.arch).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), got)


@pytest.mark.slow
def test_a_residual_run_prunes_the_streams_and_resumes(tmp_path):
    run = [*TINY, "model.shortcut=A", "schedule.pretrain.epochs=1", "schedule.finetune.epochs=1"]
    cfg = compose_config(*run, "prune.residual=true", "prune.ratio=0.4")
    rows = pipeline.run(cfg, tmp_path)
    assert [r["stage"] for r in rows] == ["init", "pretrain", "prune", "finetune"]
    assert abs(1 - rows[2]["params"] / rows[1]["params"] - 0.4) < 0.001
    layers = pd.read_csv(tmp_path / "layers.csv").set_index("layer")
    # the stem's stream (through every stage) and the channels stages 2 and 3 pad in, each 40% smaller
    for stream, width in (("conv1", 16), ("layers.1.0.conv2", 16), ("layers.2.0.conv2", 32)):
        assert layers.loc[stream, "before"] == width and layers.loc[stream, "after"] < width
    final = load_checkpoint(tmp_path / "checkpoints" / "finetune.pt")
    model = build_model(final["arch"])
    model.load_state_dict(final["state_dict"])
    assert count_params(model) == rows[3]["params"]
    # resume: the finetune stage again from the pruned checkpoint gives the same table
    (tmp_path / "checkpoints" / "finetune.pt").unlink()
    again = pipeline.run(compose_config(*run, "prune.residual=true", "prune.ratio=0.4"), tmp_path)
    assert [{k: r[k] for k in ("stage", "params", "macs", "top1")} for r in again] == [
        {k: r[k] for k in ("stage", "params", "macs", "top1")} for r in rows
    ]


@pytest.mark.parametrize("schedule", ["pfp"])  # merge and gates take shared groups (test_shared_methods.py)
def test_stages_that_need_one_producer_refuse_it(tmp_path, schedule):
    with pytest.raises(UserError) as e:
        pipeline.run(compose_config(*TINY, "prune.residual=true", f"schedule={schedule}"), tmp_path)
    assert e.value.option == "prune.residual"
    assert e.value.why == f"the {schedule} stage prunes only channels one layer produces"
    assert not (tmp_path / "checkpoints").exists()


def test_a_stream_is_scored_by_the_sum_over_its_layers():
    """The documented rule for a group several layers produce, against explicit loops over its layers: l1 sums its
    producers' filter norms, bn_scale its BatchNorms' |gamma|, and Taylor is |dL/da| for a factor a applied to the
    channel in every BatchNorm output at once (autograd through hooks, not the criterion's code)."""
    dense = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3, "shortcut": "B", "width_mult": 0.5})
    model = with_shared_groups(calibrated(dense, SHAPE), SHAPE)
    modules = dict(model.named_modules())
    g = next(i for i, grp in enumerate(model.channel_groups()) if grp.name == "layers.1.0.shortcut.0")
    stream = model.channel_groups()[g]
    sample = Sample(torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(2)), torch.arange(8) % 10)

    def where(slot, c):
        return c if slot.positions is None else slot.positions[c][0]

    def times(alpha, position):
        """A forward hook multiplying channel ``position`` of the output by ``alpha``."""
        return lambda m, i, out: out * (1 + (alpha - 1) * (torch.arange(out.shape[1]) == position).view(1, -1, 1, 1))

    l1 = build_criterion({"name": "l1"}).scores(model)[g]
    gamma = build_criterion({"name": "bn_scale"}).scores(model)[g]
    taylor = build_criterion({"name": "taylor", "num_images": 8}).scores(model, sample=sample)[g]
    for c in range(len(l1)):
        producers = [s for s in stream.slots if s.role == "producer"]
        norms = [s for s in stream.slots if s.role == "norm"]
        assert len(producers) == len(norms) == 4  # the projection and the three blocks' conv2
        expect = sum(modules[s.module].weight[where(s, c)].abs().sum().item() for s in producers)
        assert l1[c].item() == pytest.approx(expect, rel=1e-5)
        expect = sum(modules[s.module].weight[where(s, c)].abs().item() for s in norms)
        assert gamma[c].item() == pytest.approx(expect, rel=1e-5)
        alpha = torch.ones((), requires_grad=True)
        hooks = [modules[s.module].register_forward_hook(times(alpha, where(s, c))) for s in norms]
        model.eval()
        loss = torch.nn.functional.cross_entropy(model(sample.x), sample.y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, alpha)
        for h in hooks:
            h.remove()
        assert taylor[c].item() == pytest.approx(abs(grad.item()) / 8, rel=1e-3, abs=1e-7)


SHARED = {"mobilenet_v2": 22, "mobilenet_v3_small": 15}  # groups several layers hold


@pytest.mark.slow
@pytest.mark.parametrize("network", list(SHARED))
def test_torchvision_shared_groups_mask_as_they_prune(network):
    """Depthwise chains with inverted-residual streams (mobilenet_v2), and channels
    squeeze-excitation scales (mobilenet_v3_small: x * hardsigmoid(s), zero when x is) through the stages'
    masking, surgery and counting (not the graph's own, which tests/test_graph.py checks)."""
    arch = {"name": "torchvision", "network": network, "num_classes": 10, "in_channels": 3, "image_size": 32}
    model = with_shared_groups(calibrated(build_model(arch), SHAPE), SHAPE)
    assert sum(1 for g in model.channel_groups() if g.shared) == SHARED[network]
    g = torch.Generator().manual_seed(1)
    keep = [torch.rand(w, generator=g) < 0.6 for w in model.widths]
    for k in keep:
        k[0] = True
    pruned = prune_channels(model, keep).eval()
    mask_channels(model, keep)
    x = torch.randn(2, *SHAPE, generator=g)
    with torch.no_grad():
        expected, got = model(x), pruned(x)
    assert ((expected - got).abs().max() / expected.abs().max()) <= 1e-4
    assert layer_count(pruned, SHAPE) == structure(model, SHAPE).count([int(k.sum()) for k in keep])


class Gated(nn.Module):
    """conv-BN pairs a and b added into one stream, then a read of the stream through ``op``; a scalar gate."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 5, 1)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.fc = nn.Linear(5, 10)

    def forward(self, x):
        a, b = self.bn_a(self.a(x)), self.bn_b(self.b(x))
        if self.op == "divide":  # a masked channel would be 0 / 0
            y = a / b
        elif self.op == "add_in_place":  # y is read after it was overwritten with y + 1
            y = a + b
            y.add_(1)
        elif self.op == "excite":  # squeeze-excitation: zero wherever a + b is
            y = (a + b) * torch.sigmoid(b.mean((2, 3), keepdim=True))
        else:
            y = torch.relu(a + b)
        return self.fc(self.c(y * torch.sigmoid(self.alpha)).mean((2, 3)))


@pytest.mark.parametrize("op,offered", [("relu", True), ("excite", True), ("divide", False), ("add_in_place", False)])
def test_a_group_is_offered_only_where_masking_removes_it(op, offered, monkeypatch):
    """The stream a + b is offered exactly when zeroing its filters and BatchNorm entries gives the pruned network:
    not when a masked channel divides by 0 or is read after an in-place + 1 (the masked and the pruned network
    then differ), and the scalar gate (no channels) is no obstacle."""
    torch.manual_seed(0)
    monkeypatch.setitem(sys.modules, "gated_nets", types.SimpleNamespace(Gated=Gated))
    arch = {"name": "custom", "target": "gated_nets:Gated", "kwargs": {"op": op}, "shared": True, "image_size": 8}
    with trusting(["gated_nets:Gated"]):
        model = calibrated(build_model({**arch, "num_classes": 10, "in_channels": 3}), (3, 8, 8))
    streams = [g for g in model.channel_groups() if g.shared]
    assert bool(streams) == offered
    if offered:
        keep = [torch.arange(w) % 2 == 0 for w in model.widths]
        pruned = prune_channels(model, keep).eval()
        mask_channels(model, keep)
        x = torch.randn(4, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(model(x), pruned(x), rtol=1e-4, atol=1e-5)


def test_a_stream_pruned_to_one_channel_is_still_a_stream(monkeypatch):
    """A stream a + b left one channel wide is still traced as a stream (its one channel is the operands' own, not a
    broadcast): the pruned network rebuilds without a warning and offers it again, and masked == pruned."""
    torch.manual_seed(0)
    monkeypatch.setitem(sys.modules, "gated_nets", types.SimpleNamespace(Gated=Gated))
    arch = {"name": "custom", "target": "gated_nets:Gated", "kwargs": {"op": "relu"}, "shared": True, "image_size": 8}
    with trusting(["gated_nets:Gated"]):
        model = calibrated(build_model({**arch, "num_classes": 10, "in_channels": 3}), (3, 8, 8))
        keep = [torch.arange(w) < (1 if g.shared else w) for g, w in zip(model.channel_groups(), model.widths)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pruned = prune_channels(model, keep).eval()
    assert [w for g, w in zip(pruned.channel_groups(), pruned.widths) if g.shared] == [1]
    mask_channels(model, keep)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pruned(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_residual_checkpoint_continues_only_where_its_groups_are_handled(tmp_path):
    """init_from a network pruned with prune.residual=true: finetuning and pruning again with it work; a stage that
    prunes only one producer's channels, or pruning without prune.residual, is refused in one line."""
    first = [*TINY, "model.width_mult=0.5", "schedule.pretrain.epochs=1", "schedule.finetune.epochs=0"]
    pipeline.run(compose_config(*first, "prune.residual=true", "prune.ratio=0.3"), tmp_path / "a")
    start = f"init_from={tmp_path / 'a' / 'checkpoints' / 'prune.pt'}"
    again = [*TINY, "model.width_mult=0.5", start]
    epochs = ["schedule.pretrain.epochs=0", "schedule.finetune.epochs=0"]
    rows = pipeline.run(compose_config(*again, *epochs, "prune.residual=true", "prune.ratio=0.3"), tmp_path / "b")
    assert rows[-1]["params"] < rows[0]["params"]  # pruned again, the streams among the groups
    for overrides, option, why in (
        (["prune.residual=false", *epochs], "prune.residual", "set prune.residual=true to prune it again"),
        (["schedule=cg"], "init_from", "the cg stage prunes only channels one layer produces"),
    ):
        with pytest.raises(UserError) as e:
            pipeline.run(compose_config(*again, *overrides), tmp_path / overrides[0].replace("=", "_"))
        assert e.value.option == option and why in e.value.why


def test_the_trace_runs_on_the_networks_device_and_precision():
    """The prune stage wraps the model where it lives (a float64 network stands in for one on a GPU)."""
    dense = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3, "width_mult": 0.25}).double()
    model = with_shared_groups(dense.eval(), (3, 8, 8))
    assert sum(1 for g in model.channel_groups() if g.shared) == 3 and not model.training
