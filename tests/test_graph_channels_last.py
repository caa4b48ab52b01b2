"""ConvNeXt pruned as a CNN: the channels followed through permutes, channels-last Linear and LayerNorm, layer
scale. The residual streams a LayerNorm over the channels reads prune too (the masked network normalises over
the kept channels, as the pruned one does), and so do the MLP hidden units; the masked network equals the
pruned one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

import prune_cli
from helpers import shape_count
from prune_cli.structure.any_network import select
from prune_cli.structure.graph import ChannelGraph


class ConvNeXtLike(nn.Module):
    """A stem, one ConvNeXt block (dw conv, permute, LayerNorm, Linear-GELU-Linear, permute back, layer scale,
    residual), a channels-last transition Linear with its own layer scale (no norm: prunable), a head."""

    def __init__(self):
        super().__init__()
        self.stem, self.dw = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.transition, self.scale2 = nn.Linear(8, 12), nn.Parameter(torch.rand(12, 1, 1) + 0.5)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        t = self.norm(self.dw(x).permute(0, 2, 3, 1))
        t = self.fc2(nn.functional.gelu(self.fc1(t))).permute(0, 3, 1, 2)
        x = x + self.scale * t
        x = self.transition(x.transpose(1, 3)).transpose(1, 3) * self.scale2  # [B, W, H, C]: channels last too
        return self.head(x.mean((2, 3)))


def tiny_convnext() -> nn.Module:
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.0, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):  # 1e-6 at init: the blocks would hardly count in the check
                p.copy_(torch.rand_like(p) + 0.5)
    return model


# model builder, its input side, (unprunable, all) channel counts: only the network's input and output channels
# stay; the residual streams, the MLP hidden units (4 C per ConvNeXt block) and the transition's outputs prune
NETWORKS = {
    "block": (ConvNeXtLike, 4, (3 + 5, 3 + 8 + 16 + 12 + 5)),
    "convnext": (tiny_convnext, 16, (3 + 10, 3 + 8 + 32 + 16 + 64 + 10)),
}


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", NETWORKS)
def test_a_convnext_prunes_its_streams_and_mlps_and_masked_equals_pruned(name, ratio):
    build, side, (unprunable, channels) = NETWORKS[name]
    model = build()
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    pruned, table = prune_cli.prune(model, x, ratio)
    assert table["unprunable_share"] == pytest.approx(unprunable / channels)
    assert table["channels"] == channels - unprunable and table["params_removed"] == pytest.approx(ratio, abs=0.02)
    graph = ChannelGraph(model, x)
    masked = graph.masked(select(graph, ratio))
    for mode in ("eval", "train"):
        with torch.no_grad():
            a, b = getattr(pruned, mode)()(x), getattr(masked, mode)()(x)
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), mode
    assert (table["params"], table["macs"]) == shape_count(model, x)
    assert (table["params_pruned"], table["macs_pruned"]) == shape_count(pruned, x)


def test_the_layer_scale_and_the_linear_layers_are_sliced_with_their_channels():
    model, x = ConvNeXtLike(), torch.randn(2, 3, 4, 4)
    graph = ChannelGraph(model, x)
    assert [g.layers for g in graph.groups] == [
        ["", "dw", "fc1", "fc2", "norm", "stem", "transition"],
        ["fc1", "fc2"],
        ["", "head", "transition"],
    ]
    stream, hidden, out = (set(g.channels[:3]) for g in graph.groups)
    pruned = graph.pruned(stream | hidden | out)
    assert (pruned.stem.out_channels, pruned.dw.groups, pruned.norm.weight.shape, pruned.scale.shape) == (
        5,
        5,
        (5,),
        (5, 1, 1),
    )
    assert (pruned.fc1.in_features, pruned.fc1.out_features, pruned.fc2.in_features, pruned.fc2.out_features) == (
        5,
        13,
        13,
        5,
    )
    assert pruned.transition.out_features == pruned.head.in_features == 9 and pruned.scale2.shape == (9, 1, 1)


def test_a_layer_norm_of_a_pruned_stream_normalises_over_the_kept_channels():
    """The masked reference's layer norm against an explicit computation over the kept channels."""
    torch.manual_seed(0)
    model, x = ConvNeXtLike(), torch.randn(2, 3, 4, 4)
    graph = ChannelGraph(model, x)
    stream = graph.groups[0].channels
    removed = {stream[1], stream[6]}
    kept = [i for i in range(8) if i not in (1, 6)]
    with torch.no_grad():
        t = model.dw(model.stem(x)).permute(0, 2, 3, 1)[..., kept]
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        expected = (t - mean) / torch.sqrt(var + model.norm.eps) * model.norm.weight[kept] + model.norm.bias[kept]
        pruned = graph.pruned(removed)
        got = pruned.norm(pruned.dw(pruned.stem(x)).permute(0, 2, 3, 1))
    assert torch.allclose(got, expected, atol=1e-5)
