"""The traced channel graph on torchvision networks: the physically pruned network equals the masked one (every
traced tensor zeroed at the removed channels, no surgery), its params and MACs equal a count from its layers'
shapes, and it trains."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from helpers import randomized, removal, shape_count
from prune_cli.structure.graph import ChannelGraph

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "vgg11_bn", "densenet121", "efficientnet_b0"]
GROUPED = ["regnet_x_400mf", "resnext50_32x4d"]  # grouped convs: a whole conv group goes


def randomized_network(name: str) -> nn.Module:
    """A torchvision network: random init, 10 classes, norm layers drawn too (``helpers.randomized``)."""
    torch.manual_seed(0)
    return randomized(getattr(torchvision.models, name)(num_classes=10))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS + GROUPED)
def test_pruned_equals_masked_and_counts_match(name):
    torch.set_num_threads(1)
    model = randomized_network(name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every operation of these networks is mapped
        graph = ChannelGraph(model, x)
    share, reasons = graph.share_unprunable()
    assert set(reasons) == {"the network's input", "the network's output"}  # nothing else is unprunable
    assert share < (0.015 if name in GROUPED else 0.01)  # a conv group counts as one channel
    dense = graph.count(set())
    assert dense == shape_count(model, x)
    for i, part in enumerate((0.3, 0.5)):
        removed = removal(graph, part, seed=i)
        pruned, masked = graph.pruned(removed).eval(), graph.masked(removed).eval()
        with torch.no_grad():
            a, b = pruned(x), masked(x)
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), name
        assert graph.count(removed) == shape_count(pruned, x)
        assert graph.count(removed)[0] < dense[0]
    pruned.train()  # one epoch of 64 synthetic images, batches of 32
    opt = torch.optim.SGD(pruned.parameters(), lr=0.01, momentum=0.9)
    data = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(4))
    for j in range(0, 64, 32):
        loss = F.cross_entropy(pruned(data[j : j + 32]), labels[j : j + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)


BUILTIN = [  # every built-in family and depth, both shortcut options, VGG with both heads
    *({"name": n} for n in ("resnet20", "resnet32", "resnet56", "resnet110", "resnet18", "resnet34")),
    {"name": "resnet56", "shortcut": "B"},
    *({"name": n} for n in ("vgg11", "vgg13", "vgg16", "vgg19")),
    {"name": "vgg16", "head": "linear"},
    {"name": "plain", "widths": [8, 16, 16], "strides": [1, 2, 1]},  # what the rm stage makes
]


@pytest.mark.parametrize("arch", BUILTIN, ids=lambda a: "-".join(map(str, a.values())))
def test_builtin_groups_are_the_hand_written_ones_plus_the_residual_streams(arch):
    from prune_cli.models import build_model

    model = build_model({"num_classes": 10, "in_channels": 3, **arch}).eval()
    graph = ChannelGraph(model, torch.randn(2, 3, 32, 32))
    hand = {frozenset([g.conv, g.bn, *g.consumers]) for g in model.channel_groups()}
    found = {frozenset(g.layers): len(g.channels) for g in graph.groups}
    assert hand <= set(found)
    for g in model.channel_groups():  # the same channels, all of them
        assert found[frozenset([g.conv, g.bn, *g.consumers])] == model.get_submodule(g.conv).out_channels
    streams = set(found) - hand  # the rest: one residual stream per stage (ResNets), written by the blocks' bn2
    stages = 4 if arch["name"] in ("resnet18", "resnet34") else 3
    assert len(streams) == (stages if arch["name"].startswith("resnet") else 0)
    assert all(any(layer.endswith("bn2") for layer in s) for s in streams)
    assert set(graph.share_unprunable()[1]) == {"the network's input", "the network's output"}  # nothing else


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_residual_streams_pruned_to_half_the_params(shortcut):
    """Every group, residual streams included, loses the same share of its channels, the share found by bisection
    on the computed count so that 50% of the params go: the pruned ResNet-56 equals the masked one, and its params
    and MACs are what its layers' shapes give."""
    from prune_cli.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "resnet56", "num_classes": 10, "in_channels": 3, "shortcut": shortcut}).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    graph = ChannelGraph(model, x)
    dense = graph.count(set())[0]
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if graph.count(removal(graph, mid, seed=0))[0] > dense / 2 else (lo, mid)
    removed = removal(graph, hi, seed=0)
    params, macs = graph.count(removed)
    # a stem-stream channel of option A reaches every stage (carried by the padding): one of them is ~2% of the params
    assert abs(params / dense - 0.5) < 0.03
    streams = [g for g in graph.groups if any(layer.endswith("bn2") for layer in g.layers)]
    assert len(streams) == 3 and all(any(c in removed for c in g.channels) for g in streams)  # streams lost channels
    pruned, masked = graph.pruned(removed).eval(), graph.masked(removed).eval()
    with torch.no_grad():
        a, b = pruned(x), masked(x)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert (params, macs) == shape_count(pruned, x)
    assert pruned.fc.in_features < 64


class ChannelsLastMLP(nn.Module):
    """A conv, then an MLP over the channels in channels-last layout ([B, H, W, C], H == C by design), then back."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 4, 1), nn.Linear(4, 8), nn.Linear(8, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        t = self.conv(x).permute(0, 2, 3, 1)
        t = self.fc2(F.gelu(self.fc1(t))).permute(0, 3, 1, 2)
        return self.head(t.mean((2, 3)))


def test_a_linear_layer_on_channels_last_tensors_is_not_mistaken_for_channels():
    """dim 1 of [B, H, W, C] is H; were it taken for the channels (H == C here), the masks would not fit and
    the MLP's hidden units would be paired wrongly. The channels move with the permute: the hidden units are
    fc1's rows and fc2's columns, one group, and the masked network equals the pruned one."""
    torch.manual_seed(0)
    model, x = ChannelsLastMLP().eval(), torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ChannelGraph(model, x)
    assert not any("channels last" in str(w.message) for w in caught)
    assert ["fc1", "fc2"] in [g.layers for g in graph.groups]
    removed = removal(graph, 0.5, seed=0)
    with torch.no_grad():
        a, b = graph.pruned(removed).eval()(x), graph.masked(removed).eval()(x)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert graph.count(removed) == shape_count(graph.pruned(removed), x)
