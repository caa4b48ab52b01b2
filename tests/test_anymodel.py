"""prune_cli.prune on a user's own network object: scores summed over a group's producers, the k lowest removed,
the target met from the exact count; unmapped operations warn and keep their channels; untraceable code is named."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prune_cli
from prune_cli.core.errors import UserError
from prune_cli.structure.any_network import channel_scores, select
from prune_cli.structure.graph import ChannelGraph


class Net(nn.Module):
    """Stem, a residual block (the stream shared by the stem and conv b), squeeze-excitation, a linear head."""

    def __init__(self, shuffle: bool = False):
        super().__init__()
        self.shuffle = shuffle
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.bna = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b, self.bnb = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        s = F.relu(self.bn(self.stem(x)))
        s = F.relu(s + self.bnb(self.b(F.relu(self.bna(self.a(s))))))
        s = s * torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(s, 1)))))
        if self.shuffle:  # a roll of the channels: they change places (an operation the graph does not map)
            s = s.roll(1, 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(s, 4), 1))


def test_scores_average_normalised_producer_norms_and_the_lowest_go():
    torch.manual_seed(0)
    model = Net().eval()
    graph = ChannelGraph(model, torch.randn(2, 3, 8, 8))
    stream = next(g for g in graph.groups if "stem" in g.layers)
    assert sorted(stream.layers) == sorted(["stem", "bn", "b", "bnb", "a", "se1", "se2", "fc"])
    scores = channel_scores(graph, "l1", "mean")
    for i, c in enumerate(stream.channels):  # by hand: stem, b and se2 write channel i
        expect = 0.0
        for conv in (model.stem, model.b, model.se2):
            norms = conv.weight.detach().abs().flatten(1).sum(1)
            expect += float(norms[i] / norms.mean()) / 3
        assert scores[c] == pytest.approx(expect, rel=1e-6)
    removed = select(graph, 0.25, target="channels", scope="global")
    ranked = sorted((c for g in graph.groups for c in g.channels), key=lambda c: scores[c])
    total = sum(len(g.channels) for g in graph.groups)
    assert len(removed) == round(total / 4) and removed == set(ranked[: len(removed)])  # 30 channels: 7.5 -> 8


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.55])
def test_the_removed_amount_is_the_closest_any_prefix_of_the_ranking_reaches(ratio):
    torch.manual_seed(0)
    graph = ChannelGraph(Net().eval(), torch.randn(2, 3, 8, 8))
    scores = channel_scores(graph, "l1", "mean")
    ranked = sorted((c for g in graph.groups for c in g.channels), key=lambda c: (scores[c], c))
    dense = graph.count(set())[0]
    removed = select(graph, ratio, target="params")
    got = 1 - graph.count(removed)[0] / dense
    # by brute force: the best prefix of the ranking (the rule may also skip a channel that would pass the band)
    best = min(abs(1 - graph.count(set(ranked[:k]))[0] / dense - ratio) for k in range(len(ranked) + 1))
    assert abs(got - ratio) <= best + 1e-12


def test_prune_meets_the_target_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    pruned, table = prune_cli.prune(model, x, 0.4, target="params")
    assert table["params_removed"] == pytest.approx(0.4, abs=0.03)
    assert table["params_pruned"] == sum(p.numel() for p in pruned.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pruned(x).shape == (2, 5) and pruned.fc.in_features == 16 * pruned.stem.out_channels  # 4x4 per channel


def test_an_unmapped_operation_keeps_its_channels_and_says_so():
    model = Net(shuffle=True).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ChannelGraph(model, torch.randn(2, 3, 8, 8))
    assert any("method roll" in str(w.message) for w in caught)  # the operation, named
    assert not any("stem" in g.layers for g in graph.groups)  # the shuffled stream stays whole
    assert any("a" in g.layers for g in graph.groups)  # the block's inner channels do not meet the shuffle
    share, reasons = graph.share_unprunable()
    assert share > 0 and any("roll" in r for r in reasons)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 4, 1), Gate())

    def forward(self, x):
        return self.inner(x).mean((2, 3))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # depends on the data: fx cannot trace it


def test_an_untraceable_module_is_named_in_one_line():
    with pytest.raises(UserError) as e:
        ChannelGraph(Branchy(), torch.randn(1, 3, 4, 4))
    assert e.value.option == "model" and "inner.1" in e.value.why and "\n" not in e.value.why


class LayerScale(nn.Module):
    """A conv whose output is scaled by a learned per-channel parameter (ConvNeXt's layer scale)."""

    def __init__(self):
        super().__init__()
        self.conv, self.gamma = nn.Conv2d(3, 6, 3, padding=1), nn.Parameter(torch.rand(1, 6, 1, 1))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head((self.conv(x) * self.gamma).mean((2, 3)))


def test_a_per_channel_parameter_is_sliced_with_its_channels():
    model = LayerScale().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ChannelGraph(model, torch.randn(2, 3, 8, 8))
    assert not any("untracked per-channel operand" in str(w.message) for w in caught)
    assert [g.layers for g in graph.groups] == [["", "conv", "head"]]  # gamma (the root's) goes with the conv
    assert graph.pruned(set(graph.groups[0].channels[:2])).gamma.shape == (1, 4, 1, 1)
