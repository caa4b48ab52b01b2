"""ConvNeXt through the pipeline (``model=torchvision`` / ``model=custom``): its residual streams (LayerNorms over the
channels, layer scales) and its MLP hidden units (channels-last linear layers) are channel groups the stages
prune. Counted as the graph counts; masked equal to pruned where no LayerNorm reads the channels, close where one
does (its statistics still count a zeroed channel), the surgery exact; every criterion reads the channels where
they are (the weight criteria a linear layer's [out, in], the activation criteria channels-last outputs)."""

from __future__ import annotations

import sys
import types

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from helpers import TINY, compose_config, randomized, shape_count
from prune_cli.core.checkpoint import load_checkpoint
from prune_cli.core.errors import UserError
from prune_cli.core.trust import trusting
from prune_cli.importance.criteria import Sample, build_criterion
from prune_cli.methods.hgsr import _Evaluator, loss_greedy_select
from prune_cli.methods.pfs.gates import Gates
from prune_cli.models import build_model
from prune_cli.models.graphnet import graph_groups
from prune_cli.run import pipeline
from prune_cli.structure.channels import mask_channels, prune_channels, structure
from prune_cli.structure.counting import layer_pixels
from prune_cli.structure.graph import ChannelGraph

SIDE = 16
SHAPE = (3, SIDE, SIDE)
TARGET = "tiny_convnext_net:Net"
NET_FILE = '''
import torch
from torchvision.models.convnext import CNBlockConfig, ConvNeXt


def Net(num_classes=10):
    """Two stages of one ConvNeXt block, widths 8 and 16; layer scales drawn (1e-6 at init would hide the blocks)."""
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.0,
                     num_classes=num_classes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model
'''


def tiny_convnext(num_classes: int = 10) -> nn.Module:
    """NET_FILE's network, in this process."""
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.0, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.rand_like(p) + 0.5)
    return randomized(model)


@pytest.fixture
def model(monkeypatch):
    """The tiny ConvNeXt as ``model=custom`` builds it, every group of its graph offered (``prune.residual``)."""
    monkeypatch.setitem(sys.modules, "tiny_convnext_mod", types.SimpleNamespace(Net=tiny_convnext))
    arch = {"name": "custom", "target": "tiny_convnext_mod:Net", "shared": True, "image_size": SIDE}
    with trusting(["tiny_convnext_mod:Net"]):
        return build_model({**arch, "num_classes": 10, "in_channels": 3}).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_the_streams_and_the_mlp_hidden_units_are_groups(model):
    groups = model.channel_groups()
    assert model.widths == [8, 32, 16, 64]  # stream, 4 x 8 hidden, stream, 4 x 16 hidden
    stream, hidden = groups[0], groups[1]
    roles = {(s.module, s.role, s.param, s.out_dim) for s in stream.slots}
    assert ("net.features.0.1", "norm", "", 1) in roles  # LayerNorm2d: [B, C, H, W] out
    assert ("net.features.1.0.block.2", "norm", "", 3) in roles  # the block's LayerNorm: channels last
    assert ("net.features.1.0", "param", "layer_scale", 1) in roles
    assert ("net.features.1.0.block.5", "producer", "", 3) in roles
    assert [(s.module, s.role, s.out_dim) for s in hidden.slots] == [
        ("net.features.1.0.block.3", "producer", 3),
        ("net.features.1.0.block.5", "consumer", 1),
    ]
    assert model.last_groups() == {2}  # the classifier reads the last stream; the blocks' linear layers are no head


def test_the_pipeline_counts_as_the_graph_dense_and_pruned(model):
    x = images(2)
    counted = structure(model, SHAPE)
    assert counted.count(model.widths) == ChannelGraph(model.net, x).count(set()) == shape_count(model.net, x)
    keep = [torch.arange(w) % 3 != 1 for w in model.widths]
    pruned = prune_channels(model, keep)
    assert pruned.widths == [int(k.sum()) for k in keep]
    want = ChannelGraph(pruned.net, x).count(set())
    assert counted.count(pruned.widths) == want == shape_count(pruned.net, x)
    assert pruned.net.features[1][0].layer_scale.shape == (pruned.widths[0], 1, 1)


class ScaledBlock(nn.Module):
    """A stem, a channels-last MLP, and a layer scale held by the network itself (the root module): ``net.scale``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3), nn.Linear(8, 12), nn.Linear(12, 8)
        self.scale, self.head = nn.Parameter(torch.rand(8, 1, 1) + 0.5), nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.scale * self.fc2(F.gelu(self.fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


def test_a_layer_scale_of_the_network_itself_is_sliced_and_counted(monkeypatch):
    monkeypatch.setitem(sys.modules, "scaled_block_mod", types.SimpleNamespace(Net=ScaledBlock))
    arch = {"name": "custom", "target": "scaled_block_mod:Net", "shared": True, "image_size": 6}
    with trusting(["scaled_block_mod:Net"]):
        model = build_model({**arch, "num_classes": 10, "in_channels": 3}).eval()
        assert ("net", "param", "scale") in {(s.module, s.role, s.param) for s in model.channel_groups()[0].slots}
        keep = [torch.arange(w) % 2 == 0 for w in model.widths]
        pruned = prune_channels(model, keep)
    x = torch.randn(2, 3, 6, 6)
    assert pruned.net.scale.shape == (4, 1, 1)
    assert structure(model, (3, 6, 6)).count(pruned.widths) == ChannelGraph(pruned.net, x).count(set())


def test_a_linear_layer_counts_each_position_it_runs_at():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.last, self.tokens, self.flat = nn.Linear(3, 4), nn.Linear(5, 6), nn.Linear(7, 2)

        def forward(self, x):  # x: [B, 3, 5, 7]
            a = self.last(x.permute(0, 2, 3, 1))  # [B, 5, 7, 4]: 35 positions
            b = self.tokens(a.flatten(2).transpose(1, 2)[..., :5])  # [B, 28, 6]: 28 tokens
            return self.flat(b.mean(1)[:, :1].expand(-1, 7))  # [B, 2]: one

    assert layer_pixels(Net(), (3, 5, 7)) == {"last": 35, "tokens": 28, "flat": 1}


def removed_channels(model, keep) -> tuple[set[int], ChannelGraph]:
    """The graph's channel ids of what ``keep`` leaves out (the model's groups are the graph's, in order), and the
    graph."""
    graph = ChannelGraph(model.net, images(2))
    orders = [order for _, order in graph_groups(graph, True)]
    return {order[i] for order, k in zip(orders, keep) for i in torch.nonzero(~k).flatten().tolist()}, graph


def masked_and_pruned(model, keep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits of the model masked, pruned, and of the graph's exact mask (a LayerNorm over the kept channels)."""
    x = images(4, 1)
    removed, graph = removed_channels(model, keep)
    pruned = prune_channels(model, keep).eval()
    exact = graph.masked(removed).eval()
    mask_channels(model, keep)
    with torch.no_grad():
        return model(x), pruned(x), exact(x)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_masking_the_mlp_hidden_units_is_removing_them(model):
    g = torch.Generator().manual_seed(2)
    keep = [
        torch.ones(w, dtype=torch.bool) if i % 2 == 0 else torch.rand(w, generator=g) < 0.6
        for i, w in enumerate(model.widths)
    ]
    keep[1][0] = keep[3][0] = True
    masked, pruned, exact = masked_and_pruned(model, keep)
    assert relative(masked, pruned) <= 1e-5 and relative(exact, pruned) <= 1e-5


def test_a_stream_masked_is_close_to_pruned_and_the_surgery_is_exact(model):
    """A LayerNorm reading a masked channel still counts its zero in the mean and variance: close, not equal; the
    pruned network equals the graph's mask, which normalises over the kept channels alone."""
    keep = [torch.ones(w, dtype=torch.bool) for w in model.widths]
    keep[0][3] = False  # one of the first stream's 8 channels
    masked, pruned, exact = masked_and_pruned(model, keep)
    assert 1e-5 < relative(masked, pruned) < 0.05
    assert relative(exact, pruned) <= 1e-5


def outputs(model, x) -> list[tuple[str, torch.Tensor]]:
    """Every mask point's output in [B, C, H, W], laid out by hand: a torch LayerNorm and a linear layer inside a
    block run channels last, a LayerNorm2d permutes back."""
    found = []
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: found.append((name, o)))
        for name, m in model.named_modules()
        if name in {s.module for g in model.channel_groups() for s in g.mask_points()}
    ]
    loss = F.cross_entropy(model(x), torch.arange(len(x)) % 10, reduction="sum")
    for h in hooks:
        h.remove()
    last = {name for name, m in model.named_modules() if type(m) in (nn.LayerNorm, nn.Linear)}
    grads = torch.autograd.grad(loss, [o for _, o in found])
    first = [(n, o.permute(0, 3, 1, 2) if n in last else o, d) for (n, o), d in zip(found, grads)]
    return [(n, o.detach(), d.permute(0, 3, 1, 2) if n in last else d) for n, o, d in first]


def by_hand(model, x, criterion: str) -> list[torch.Tensor]:
    """APoZ, HRank or Taylor of every group from its mask points' outputs (every group's slot holds its channels at
    0..n-1 here), summed over them as the criteria sum."""
    got = outputs(model, x)
    out = []
    for group in model.channel_groups():
        mine = [(o, d) for n, o, d in got if n in {s.module for s in group.mask_points()}]
        if criterion == "apoz":
            zeros = sum((F.relu(o) == 0).double().sum((0, 2, 3)) for o, _ in mine)
            out.append(-zeros / sum(o.numel() // o.shape[1] for o, _ in mine))
        elif criterion == "hrank":
            out.append(sum(torch.linalg.matrix_rank(F.relu(o)).double().sum(0) for o, _ in mine) / len(x))
        else:
            out.append(sum((o * d).double().sum((0, 2, 3)) for o, d in mine).abs() / len(x))
    return out


@pytest.mark.parametrize("name", ["apoz", "hrank", "taylor"])
def test_the_activation_criteria_read_the_channels_where_they_are(model, name):
    x = images(6, 3)
    options = {"batches": 1, "batch_size": 6} if name == "hrank" else {"num_images": 6}
    scores = build_criterion({"name": name, **options}).scores(model, None, Sample(x, torch.arange(6) % 10))
    for got, want in zip(scores, by_hand(model, x, name)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_the_weight_criteria_read_a_linear_layers_rows_and_columns(model):
    net = model.net
    stem, dw, fc1, fc2 = net.features[0][0], *(net.features[1][0].block[i] for i in (0, 3, 5))
    streams = stem.weight.flatten(1).abs().sum(1) + dw.weight.flatten(1).abs().sum(1) + fc2.weight.abs().sum(1)
    l1 = build_criterion({"name": "l1"})
    filters, features = l1.scores(model, "filter"), l1.scores(model, "feature")
    torch.testing.assert_close(filters[0], streams)
    torch.testing.assert_close(filters[1], fc1.weight.abs().sum(1))
    torch.testing.assert_close(features[1], fc2.weight.abs().sum(0))
    for name in ("l2", "fpgm", "entropy", "group_norm", "random"):
        scores = build_criterion({"name": name}).scores(model)
        assert [len(s) for s in scores] == model.widths and all(torch.isfinite(s).all() for s in scores), name
        assert all(s.unique().numel() > 1 for s in scores), name  # they rank


def test_bn_scale_refuses_a_layernorm_and_the_loss_greedy_takes_channels_last_outputs(model):
    with pytest.raises(UserError, match="features.0.0 has a LayerNorm2d"):
        build_criterion({"name": "bn_scale"}).check_groups(model)
    build_criterion({"name": "loss"}).check_groups(model)  # its masks act along each slot's out_dim


# ------------------------------------------------------------------ the loss greedy and PFS's gates


def zeroing(model, group, channel: int) -> list:
    """Hooks zeroing ``channel`` of ``group`` by hand in every producer's and norm's output, the channels of a
    LayerNorm or linear layer inside a block last ([B, H, W, C]), of any other layer in dim 1."""
    last = {name for name, m in model.named_modules() if type(m) in (nn.LayerNorm, nn.Linear)}
    modules = dict(model.named_modules())

    def hook(module, inputs, out, name):
        out = out.clone()
        if name in last:
            out[..., channel] = 0
        else:
            out[:, channel] = 0
        return out

    return [
        modules[s.module].register_forward_hook(lambda m, i, o, name=s.module: hook(m, i, o, name))
        for s in group.role("producer") + group.role("norm")
    ]


def hand_losses(model, x, y) -> list[torch.Tensor]:
    """Mean cross-entropy with each channel of each group zeroed alone by :func:`zeroing` (float64)."""
    out = []
    for group, width in zip(model.channel_groups(), model.widths):
        losses = []
        for c in range(width):
            hooks = zeroing(model, group, c)
            with torch.no_grad():
                losses.append(float(F.cross_entropy(model(x), y)))
            for h in hooks:
                h.remove()
        out.append(torch.tensor(losses, dtype=torch.float64))
    return out


@pytest.mark.parametrize("side", [SIDE, 32])  # 32: the first stage's maps are 8 x 8 with 8 channels, H == C
def test_the_loss_greedy_masks_and_estimates_along_the_channels_last_dim(model, side):
    x = torch.randn(6, 3, side, side, generator=torch.Generator().manual_seed(4))
    y = torch.arange(6) % 10
    ev = _Evaluator(model, x, y, structure(model, (3, side, side)), cache=True, batch_variants=3)
    loss = ev.trunk(keep_graph=True)
    taylor = ev.taylor()
    with torch.no_grad():
        assert loss == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-6)
    for g, want in enumerate(hand_losses(model, x, y)):
        torch.testing.assert_close(ev.variants(g, list(range(model.widths[g]))), want, rtol=1e-5, atol=1e-7)
    # first order: -sum(a * dL/da) at the mask points, read as [B, C, H, W] by hand (the criteria's test's outputs)
    got = outputs(model, x)
    for g, group in enumerate(model.channel_groups()):
        mine = [(o, d) for n, o, d in got if n in {s.module for s in group.mask_points()}]
        want = -sum((o * d).double().sum((0, 2, 3)) for o, d in mine) / len(x)  # outputs() sums the loss
        torch.testing.assert_close(taylor[g], want, rtol=1e-4, atol=1e-7)
    ev.close()


def test_the_loss_greedy_removes_first_the_channel_closest_to_the_loss(model):
    """The exact greedy's first channel is the one whose removal, measured by hand, changes the loss least."""
    x, y = images(6, 5), torch.arange(6) % 10
    keep, stats = loss_greedy_select(
        model, x, y, structure=structure(model, SHAPE), target="channels", ratio=0.01, mode="exact"
    )
    with torch.no_grad():
        l0 = float(F.cross_entropy(model(x), y))
    change = [(losses - l0).abs() for losses in hand_losses(model, x, y)]
    g = int(torch.argmin(torch.stack([c.min() for c in change])))
    assert stats["removed"] == [(g, int(torch.argmin(change[g])))]
    assert sum(int((~k).sum()) for k in keep) == round(0.01 * sum(model.widths)) == 1


def gated_outputs(model, gates: Gates) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list]:
    """Every gated layer's output with the gates and as the layer computes it alone (``forward``: no hooks), by
    hooks registered after the gates' (returned, to remove)."""
    found = {}

    def record(module, inputs, out, name):
        found[name] = (out, module.forward(*inputs))

    return found, [
        m.register_forward_hook(lambda m, i, o, name=name: record(m, i, o, name))
        for name, m in model.named_modules()
        if name in {s.module for g in gates.groups for s in g.mask_points()}
    ]


@pytest.mark.parametrize("side", [SIDE, 32])
def test_a_pfs_gate_at_zero_zeroes_its_channel_where_it_sits(model, side):
    """One gate per group at 0: in every layer gating the group, that channel of the output (last in a LayerNorm or
    linear layer inside a block) is 0 and every other entry is the layer's own output."""
    gates = Gates(model)
    chosen = [w // 2 - 1 for w in model.widths]
    with torch.no_grad():
        for p, c in zip(gates.params, chosen):
            p[c] = 0.0
    found, hooks = gated_outputs(model, gates)
    with torch.no_grad():
        model(torch.randn(2, 3, side, side))
    for h in hooks:
        h.remove()
    last = {name for name, m in model.named_modules() if type(m) in (nn.LayerNorm, nn.Linear)}
    assert len(found) == sum(len(g.mask_points()) for g in gates.groups) == 7
    for group, c in zip(gates.groups, chosen):
        for slot in group.mask_points():
            gated, alone = (t.movedim(-1, 1) if slot.module in last else t for t in found[slot.module])
            assert (gated[:, c] == 0).all() and (alone[:, c] != 0).any()
            others = torch.arange(gated.shape[1]) != c
            assert torch.equal(gated[:, others], alone[:, others])


@pytest.mark.slow
def test_the_pipeline_prunes_finetunes_and_counts_a_convnext(tmp_path, monkeypatch):
    (tmp_path / "tiny_convnext_net.py").write_text(NET_FILE)
    monkeypatch.chdir(tmp_path)
    run = [*TINY, "model=custom", f"model.target={TARGET}", "schedule.pretrain.epochs=1", "schedule.finetune.epochs=1"]
    with trusting([TARGET]):
        pipeline.run(compose_config(*run, "criterion=taylor", "criterion.num_images=32"), tmp_path / "run")
        rows = pd.read_csv(tmp_path / "run" / "results.csv").set_index("stage")
        finetuned = load_checkpoint(tmp_path / "run" / "checkpoints" / "finetune.pt")
        net = build_model(finetuned["arch"]).net
    layers = pd.read_csv(tmp_path / "run" / "layers.csv")
    assert len(layers) == 4 and (layers["after"] < layers["before"]).all()
    assert abs(1 - rows.loc["prune", "params"] / rows.loc["pretrain", "params"] - 0.5) <= 0.01
    x = images(2)
    assert (rows.loc["finetune", "params"], rows.loc["finetune", "macs"]) == ChannelGraph(net, x).count(set())


LOSS = ["criterion=loss", "criterion.num_images=8", "prune.target=channels", "prune.ratio=0.1"]
PFS = ["schedule=pfs", "prune.target=macs", "prune.ratio=0.3", "dataset.val_split=32", "schedule.gates.epochs=1"]


@pytest.mark.parametrize(
    "method",
    [[*LOSS, "schedule.pretrain.epochs=0", "schedule.finetune.epochs=0"], [*PFS, "schedule.scratch.epochs=0"]],
    ids=["loss", "pfs"],
)
def test_the_loss_greedy_and_pfs_prune_a_convnext_through_the_pipeline(tmp_path, monkeypatch, method):
    (tmp_path / "tiny_convnext_net.py").write_text(NET_FILE)
    monkeypatch.chdir(tmp_path)
    with trusting([TARGET]):
        rows = pipeline.run(compose_config(*TINY, "model=custom", f"model.target={TARGET}", *method), tmp_path / "run")
    stages = {row["stage"]: row for row in rows}
    pruned = stages["prune" if "prune" in stages else "gates"]
    removed = 1 - pruned["macs"] / stages["init"]["macs"]
    layers = pd.read_csv(tmp_path / "run" / "layers.csv")
    assert len(layers) == 4 and layers["before"].tolist() == [8, 32, 16, 64]
    if "criterion=loss" in method:  # 10% of the 120 channels, the last stream (prune.protect_last) kept whole
        assert layers["after"].sum() == 120 - 12 and layers["after"][2] == 16 and removed > 0
    else:  # the gates meet the MACs reduction as closely as whole channels allow
        assert abs(removed - 0.3) <= 0.01 and (layers["after"] < layers["before"]).any()
