"""PFS gates and Neuron Merging on channel groups several layers hold (prune.residual=true): a residual stream's
channel gated once at every BatchNorm holding it, and merged with all its producers' filters into every consumer,
against explicit loops over the group's slots."""

from __future__ import annotations

import copy
import math
import sys
import types

import pandas as pd
import pytest
import torch
from torch import nn

from helpers import TINY, calibrated, compose_config
from prune_cli.core.trust import trusting
from prune_cli.methods.merging import merge_removed
from prune_cli.methods.pfs.gates import Gates, train_gates
from prune_cli.methods.pfs.selection import select_top_gates
from prune_cli.models import build_model, with_shared_groups
from prune_cli.run import pipeline
from prune_cli.structure.channels import mask_channels, prune_channels, structure

SHAPE = (3, 8, 8)
STEM = "conv1"  # option A: the stem's stream runs through all three stages, at an offset in the later ones


@pytest.fixture(scope="module")
def streams():
    """A ResNet-20 (widths 4-8-16, option-A shortcuts) with realistic BN statistics, its streams offered as groups."""
    dense = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3, "shortcut": "A", "width_mult": 0.25})
    return with_shared_groups(calibrated(dense, SHAPE), SHAPE)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def group_index(model, name: str) -> int:
    return next(i for i, g in enumerate(model.channel_groups()) if g.name == name)


def where(slot, c: int) -> tuple[int, ...]:
    """The positions of the group's channel c in the slot's layer."""
    return (c,) if slot.positions is None else slot.positions[c]


# ------------------------------------------------------------------ PFS gates


def test_pfs_gates_a_stream_once_everywhere_and_its_architecture_prunes(streams):
    """Gates trained a few steps on the frozen init; the top gates prune the stem's stream in every layer holding it,
    and the network gated 0/1 at every BatchNorm equals the masked and the pruned one, in train and eval mode."""
    model = copy.deepcopy(streams).train()
    gates = Gates(model)
    assert [p.numel() for p in gates.params] == model.widths
    batches = [(images(8, 2 + e), torch.arange(8) % 10) for e in range(2)]
    before = [p.detach().clone() for p in model.parameters()]
    result = train_gates(model, gates, lambda e: batches[e : e + 1], lambda m: 0.0, epochs=2, lr=0.2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the weights stay at init
    assert len(result["history"]) == 2 and any(not torch.all(v == 1) for v in result["gates"])  # the gates moved
    gates.remove()
    counted = structure(model, SHAPE)
    keep, info = select_top_gates(result["gates"], counted, counted.count(model.widths)[1], 0.5)
    stem = group_index(model, STEM)
    removed = len(keep[stem]) - int(keep[stem].sum())
    assert info["met"] and 0 < removed < len(keep[stem])

    x = images(8, 1)
    for training in (True, False):
        masked, gated = copy.deepcopy(model).train(training), copy.deepcopy(model).train(training)
        mask_channels(masked, keep)
        pruned = prune_channels(masked, keep)
        assert pruned.training == training
        binary = Gates(gated)
        binary.load_([k.float() for k in keep])
        with torch.no_grad():
            want = pruned(x)
            torch.testing.assert_close(masked(x), want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gated(x), want, rtol=1e-4, atol=1e-5)
    dense_modules, pruned_modules = dict(model.named_modules()), dict(pruned.named_modules())
    gone = {}  # (layer, dim) -> positions removed there, by every group
    for group, k in zip(model.channel_groups(), keep):
        for slot in group.slots:
            key = (slot.module, slot.dim)
            gone[key] = gone.get(key, 0) + (len(k) - int(k.sum())) * len(where(slot, 0))
    for slot in model.channel_groups()[stem].slots:  # every layer holding the stream lost its removed channels
        size = dense_modules[slot.module].weight.shape[slot.dim] - gone[slot.module, slot.dim]
        assert pruned_modules[slot.module].weight.shape[slot.dim] == size


def test_schedule_pfs_prunes_the_streams_with_prune_residual(tmp_path):
    """The gates stage takes shared groups (it used to refuse them): the stem's stream loses channels and the MACs
    reduction, against the standard ResNet-20 (the 0.25-wide one is 93.5% below it already), is met."""
    tiny = [*TINY, "model.width_mult=0.25", "model.shortcut=A", "dataset.val_split=32", "prune.target=macs"]
    epochs = ["schedule.gates.epochs=1", "schedule.scratch.epochs=0"]
    rows = pipeline.run(
        compose_config(*tiny, *epochs, "schedule=pfs", "prune.residual=true", "prune.ratio=0.96"), tmp_path
    )
    assert [r["stage"] for r in rows] == ["init", "gates", "scratch"]
    standard = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3})
    reference = structure(standard, (3, 16, 16)).count(standard.widths)[1]
    assert abs(1 - rows[1]["macs"] / reference - 0.96) <= 1e-3 * 0.96 and rows[2]["macs"] == rows[1]["macs"]
    layers = pd.read_csv(tmp_path / "layers.csv").set_index("layer")
    assert layers.loc[STEM, "after"] < layers.loc[STEM, "before"] == 4


# ------------------------------------------------------------------ Neuron Merging


def loop_z(model, group, keep, lam: float, threshold: float, bn_form: str) -> list[list[float]]:
    """The group's merge matrix by explicit loops: a channel's filter is its rows in every producer side by side; z
    and the bias term are each BatchNorm's (the official or the exact relation), averaged over the BatchNorms."""
    modules = dict(model.named_modules())
    n, kept = len(keep), [c for c in range(len(keep)) if keep[c]]
    rows = [[] for _ in range(n)]
    for slot in group.role("producer"):
        for c in range(n):
            for q in where(slot, c):
                rows[c] += modules[slot.module].weight[q].flatten().tolist()
    norms = [(modules[slot.module], [where(slot, c)[0] for c in range(n)]) for slot in group.role("norm")]
    length = [math.sqrt(sum(v * v for v in row)) for row in rows]
    z = [[1.0 if c == k else 0.0 for k in kept] for c in range(n)]
    for p in (c for c in range(n) if not keep[c]):
        cos, scale, bias = [], [], []
        for k in kept:
            s = length[p] / length[k]
            terms = [bn_relation(bn, at[p], at[k], s, bn_form) for bn, at in norms]
            cos.append(sum(a * b for a, b in zip(rows[p], rows[k])) / (length[p] * length[k]))
            scale.append(sum(t[0] for t in terms) / len(terms))
            bias.append(sum(t[1] for t in terms) / len(terms))
        finite = [d for d in bias if d != math.inf]
        lo, hi = min(finite), max(finite)
        score = [lam * (1 - c) + (1 - lam) * ((d - lo) / (hi - lo) if hi > lo else 0.0) for c, d in zip(cos, bias)]
        best = min((i for i in range(len(kept)) if bias[i] != math.inf), key=lambda i: score[i])
        if cos[best] >= threshold:
            z[p][best] = scale[best]
    return z


def bn_relation(bn, p: int, k: int, s: float, bn_form: str) -> tuple[float, float]:
    """(z, bias term) of entries p and k of one BatchNorm, for filters of norm ratio s (docs/methods.md)."""
    g, b, mu, var = (t.tolist() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    if bn_form == "official":
        z = s * (g[k] / g[p]) * (var[p] / var[k])
        return z, abs((g[k] / var[k]) * (s * (mu[p] - var[p] * b[p] / g[p]) - mu[k]) + b[k]) / z
    sp, sk = math.sqrt(var[p] + bn.eps), math.sqrt(var[k] + bn.eps)
    z = s * g[p] * sk / (g[k] * sp)
    return z, abs(b[p] - z * b[k] + g[p] * (s * mu[k] - mu[p]) / sp) / z if z > 0 else math.inf


def loop_merged(model, keep, lam: float, threshold: float, bn_form: str):
    """A copy of ``model`` whose consumers, slot by slot, add z_p times a removed channel's columns to its match's,
    at every position of the two channels (the removed columns stay, for the mask or the surgery to drop), and the
    merge matrix of every group. Group by group, in order, each matched on the weights the earlier ones left (a
    block's conv2 reads the merged conv1 channels and produces the stream), as the stage does."""
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    matrices = []
    with torch.no_grad():
        for group, k in zip(merged.channel_groups(), keep):
            if k.all() or not group.role("consumer"):
                matrices.append(None)
                continue
            z, kept = loop_z(merged, group, k.tolist(), lam, threshold, bn_form), torch.nonzero(k).flatten().tolist()
            matrices.append(z)
            for slot in group.role("consumer"):
                weight = modules[slot.module].weight
                before = weight.clone()
                for i, c in enumerate(kept):
                    for p in range(len(k)):
                        if p != c and z[p][i] != 0:
                            for qc, qp in zip(where(slot, c), where(slot, p)):
                                weight[:, qc] += z[p][i] * before[:, qp]
    return merged, matrices


@pytest.mark.parametrize("bn_form", ["official", "exact"])
def test_merging_a_stream_equals_the_loop_over_its_slots(streams, bn_form):
    model = copy.deepcopy(streams)
    generator = torch.Generator().manual_seed(4)
    keep = [torch.rand(w, generator=generator) < 0.6 for w in model.widths]
    for k in keep:
        k[0] = True
    stem = group_index(model, STEM)
    keep[stem] = torch.tensor([True, False, True, False])
    want, matrices = loop_merged(model, keep, 0.85, -1.0, bn_form)  # threshold -1: every removed channel merges
    got = copy.deepcopy(model)
    merged = merge_removed(got, keep, 0.85, -1.0, bn_form)
    assert merged == sum(
        sum(any(v != 0 for v in z[p]) for p in range(len(z)) if not keep[g][p]) for g, z in enumerate(matrices) if z
    )
    assert all(any(matrices[stem][p]) for p in (1, 3))  # the stream's removed channels merged
    for slot in (s for g in model.channel_groups() for s in g.role("consumer")):
        torch.testing.assert_close(got.get_submodule(slot.module).weight, want.get_submodule(slot.module).weight)
    x = images(8, 5)
    mask_channels(want, keep)
    with torch.no_grad():
        torch.testing.assert_close(prune_channels(got, keep).eval()(x), want(x), rtol=1e-5, atol=1e-5)


def make_stream_multiple(model, group, p: int, k: int, s: float, z: float) -> None:
    """In every producer, channel p's filter becomes s times channel k's; in every BatchNorm, p's entries give
    BN_p(s u) = z BN_k(u) (the exact relation with c = 0): the stream then carries p = z k everywhere."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for slot in group.role("producer"):
            weight = modules[slot.module].weight
            (qp,), (qk,) = where(slot, p), where(slot, k)
            weight[qp] = s * weight[qk]
        for slot in group.role("norm"):
            bn = modules[slot.module]
            (qp,), (qk,) = where(slot, p), where(slot, k)
            sigma = torch.sqrt(bn.running_var + bn.eps)
            bn.weight[qp] = z * bn.weight[qk] * sigma[qp] / (s * sigma[qk])
            bn.bias[qp] = z * bn.bias[qk] - bn.weight[qp] * (s * bn.running_mean[qk] - bn.running_mean[qp]) / sigma[qp]


def test_merging_a_stream_channel_proportional_to_a_kept_one_is_exact(streams):
    """The paper's exactness case on the stem's stream (ten producers and BatchNorms, at offsets in stages 2 and 3):
    removing channel 3, a positive multiple of channel 1 in every layer, and merging it gives the dense network."""
    model = copy.deepcopy(streams)
    stem = group_index(model, STEM)
    make_stream_multiple(model, model.channel_groups()[stem], 3, 1, s=1.7, z=1.3)
    keep = [torch.ones(w, dtype=torch.bool) for w in model.widths]
    keep[stem][3] = False
    x = images(8, 6)
    with torch.no_grad():
        dense, plain = model(x), prune_channels(model, keep)(x)
        merged = copy.deepcopy(model)
        assert merge_removed(merged, keep, 0.85, 0.1, "exact") == 1
        torch.testing.assert_close(prune_channels(merged, keep)(x), dense, rtol=1e-5, atol=1e-5)
    assert (plain - dense).abs().max() > 1e-2  # pruning alone changes the outputs


class DepthwiseResidual(nn.Module):
    """A stream (stem and project, each with its BatchNorm) around an inverted residual: 1x1 expand, 3x3 depthwise."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(in_channels, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.expand, self.bn1 = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.depthwise, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.project, self.bn3 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(self.bn2(self.depthwise(torch.relu(self.bn1(self.expand(x))))))
        return self.fc(torch.relu(x + self.bn3(self.project(h))).mean((2, 3)))


def test_a_depthwise_chain_is_pruned_without_merging(monkeypatch):
    """The expand-depthwise chain (a grouped conv among its producers) is pruned plainly: its consumer keeps its
    weights; the stream around it merges, into the expand conv and the classifier."""
    monkeypatch.setitem(sys.modules, "shared_nets", types.SimpleNamespace(DepthwiseResidual=DepthwiseResidual))
    arch = {"name": "custom", "target": "shared_nets:DepthwiseResidual", "shared": True, "image_size": 8}
    with trusting(["shared_nets:DepthwiseResidual"]):
        model = calibrated(build_model({**arch, "num_classes": 10, "in_channels": 3}), SHAPE)
    assert [g.name for g in model.channel_groups()] == ["stem", "expand"]
    keep = [torch.tensor([True, True, False, True]), torch.arange(8) % 3 != 1]
    merged = copy.deepcopy(model)
    assert merge_removed(merged, keep, 0.85, -1.0, "exact") == 1  # the stream's channel, none of the chain's
    torch.testing.assert_close(merged.net.project.weight, model.net.project.weight, rtol=0, atol=0)
    for name in ("expand", "fc"):
        assert not torch.equal(getattr(merged.net, name).weight, getattr(model.net, name).weight)
    x = images(4, 7)
    with torch.no_grad():
        pruned = prune_channels(merged, keep)(x)
        mask_channels(merged, keep)
        torch.testing.assert_close(pruned, merged(x), rtol=1e-5, atol=1e-5)


def test_schedule_merge_prunes_and_merges_the_streams_with_prune_residual(tmp_path):
    """The merge stage takes shared groups (it used to refuse them): the stem's stream loses channels, merged."""
    tiny = [*TINY, "model.width_mult=0.25", "model.shortcut=A", "schedule.pretrain.epochs=0"]
    rows = pipeline.run(compose_config(*tiny, "schedule=merge", "prune.residual=true", "prune.ratio=0.4"), tmp_path)
    assert [r["stage"] for r in rows] == ["init", "pretrain", "merge"] and rows[2]["merged_channels"] > 0
    assert abs(1 - rows[2]["params"] / rows[1]["params"] - 0.4) < 1e-3  # as close as whole channels allow
    layers = pd.read_csv(tmp_path / "layers.csv").set_index("layer")
    assert layers.loc[STEM, "after"] < layers.loc[STEM, "before"] == 4
