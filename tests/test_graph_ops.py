"""The traced channel graph on every kind of operation a CNN uses, one small network per kind: the physically
pruned network equals the masked one (every traced tensor zeroed at the removed channels) in eval and in training
mode, and its params and MACs equal a count from its layers' shapes."""

from __future__ import annotations

import copy
import warnings
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prune_cli
from helpers import randomized, removal, shape_count
from prune_cli.core.errors import UserError
from prune_cli.structure.graph import ChannelGraph

Outputs = namedtuple("Outputs", ["logits", "aux"])


def outputs(y) -> list[torch.Tensor]:
    return list(y) if isinstance(y, tuple) else [y]


def check(model: nn.Module, x: torch.Tensor, removed: set[int] | None = None, graph: ChannelGraph | None = None):
    """Prune half of every group (or ``removed``): pruned == masked in eval and training mode (training: both on
    the same batch, BatchNorm on its statistics), params and MACs as the pruned layers' shapes give. The pruned
    network and the graph."""
    graph = graph or ChannelGraph(model, x)
    removed = removal(graph) if removed is None else removed
    assert removed, "nothing to prune"
    pruned, masked = graph.pruned(removed), graph.masked(removed)
    for mode in ("eval", "train"):
        with torch.no_grad():
            a, b = outputs(getattr(pruned, mode)()(x)), outputs(getattr(masked, mode)()(x))
        assert len(a) == len(b)
        for p, m in zip(a, b):
            assert p.shape == m.shape and (p - m).abs().max() <= 1e-4 * m.abs().max(), mode
    assert graph.count(removed) == shape_count(pruned, x)
    assert graph.count(set()) == shape_count(model, x)
    return pruned.eval(), graph


# ---------------------------------------------------------------------- 1. every mode


class AuxNet(nn.Module):
    """A stem, a body and a head; in training mode an auxiliary head on the stem's channels, both logits
    returned as a named tuple (GoogLeNet's shape of things)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.body, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.aux = nn.Sequential(
            nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 5)
        )
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        s = F.relu(self.bn(self.stem(x)))
        aux = self.aux(s) if self.training else None
        logits = self.fc(F.relu(self.bn2(self.body(s))).mean((2, 3)))
        return Outputs(logits, aux) if self.training else logits


def test_layers_run_only_in_training_mode_are_pruned_too():
    torch.manual_seed(0)
    model, x = randomized(AuxNet()), torch.randn(4, 3, 8, 8)
    pruned, graph = check(model, x)
    assert pruned.aux[0].in_channels == pruned.stem.out_channels < 8  # the aux head reads the pruned stem
    assert pruned.aux[4].in_features == 64 * pruned.aux[0].out_channels < 6 * 64
    assert model.training is False and all(not m.training for m in model.modules())  # modes left alone
    # params count the aux head; MACs are the eval-mode forward's: the aux head adds none
    aux_params = sum(p.numel() for p in model.aux.parameters())
    eval_macs = 64 * (8 * 3 * 9 + 8 * 8 * 9) + 8 * 5
    assert graph.count(set()) == (sum(p.numel() for p in model.parameters()), eval_macs) and aux_params > 0
    reasons = graph.share_unprunable()[1]
    assert set(reasons) == {"the network's input", "the network's output"}
    assert reasons["the network's output"] == 5 + 5  # both logits of the named tuple


def test_the_training_trace_leaves_the_statistics_and_the_random_state_alone():
    torch.manual_seed(0)
    model = randomized(AuxNet())
    before, x = copy.deepcopy(model.state_dict()), torch.randn(1, 3, 8, 8)
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    ChannelGraph(model, x)  # batch 1: the training-mode shapes from two copies of it
    assert torch.equal(torch.rand(1), expected)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class TooSmallInTraining(nn.Module):
    """Its training-mode branch pools 16 x 16 windows (Inception's aux head needs a 299 x 299 input so)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        s = self.conv(x)
        s = F.avg_pool2d(s, 16) if self.training else s
        return self.fc(s.mean((2, 3)))


def test_a_network_that_fails_in_training_mode_on_the_example_is_refused_in_one_line(capsys):
    with pytest.raises(UserError) as e:
        ChannelGraph(TooSmallInTraining().eval(), torch.randn(2, 3, 8, 8))
    assert e.value.option == "model" and "in training mode on an input of shape (2, 3, 8, 8)" in e.value.why
    assert "\n" not in e.value.why and capsys.readouterr().err == ""  # no traceback printed


# ---------------------------------------------------------------------- 2. state-dict metadata


class Versioned(nn.Module):
    """A module that checks its state dict's version when loading, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_the_pruned_state_dict_keeps_the_module_versions():
    torch.manual_seed(0)
    model, x = randomized(Versioned()), torch.randn(2, 3, 8, 8)
    pruned, graph = check(model, x)
    state = pruned.state_dict()
    assert state._metadata[""]["version"] == 2 and state._metadata["bn"]["version"] == nn.BatchNorm2d._version
    copy.deepcopy(pruned).load_state_dict(state)  # the version check passes
    assert pruned.conv.out_channels == 4


# ---------------------------------------------------------------------- 3. layers known by what they compute


class StandardizedConv(nn.Conv2d):
    """Weight standardisation: each filter normalised over its inputs and kernel before the conv."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias, self.stride, self.padding)


class BatchNormReLU(nn.BatchNorm2d):
    """A BatchNorm fused with its activation (traced into: its forward is not BatchNorm's)."""

    def forward(self, x):
        return F.relu(super().forward(x))


class PlainConv(nn.Conv2d):
    """A subclass that keeps the layer's forward."""


class HalfLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight * 0.5, self.bias)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = PlainConv(3, 8, 3, padding=1), BatchNormReLU(8)
        self.ws, self.bn2 = StandardizedConv(8, 8, 3, padding=1), BatchNormReLU(8)
        self.conv = nn.Conv2d(8, 6, 1)
        self.fc1, self.fc2 = HalfLinear(6, 10), nn.Linear(10, 5)

    def forward(self, x):
        s = self.bn2(self.ws(self.bn(self.stem(x))))
        return self.fc2(F.relu(self.fc1(self.conv(s).mean((2, 3)))))


def test_functional_layers_on_a_modules_own_parameters_are_the_layers():
    torch.manual_seed(0)
    model, x = randomized(Functional()), torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every operation is mapped
        graph = ChannelGraph(model, x)
    layers = {frozenset(g.layers): len(g.channels) for g in graph.groups}
    assert layers == {frozenset(["ws", "bn2", "conv"]): 8, frozenset(["conv", "fc1"]): 6, frozenset(["fc1", "fc2"]): 10}
    # the stem's channels are the standardised conv's inputs: the standardisation's statistics run over them
    assert any("reduction over its dim 1" in reason for reason in graph.share_unprunable()[1])
    pruned, _ = check(model, x, graph=graph)
    assert pruned.ws.out_channels == pruned.bn2.num_features == 4 and pruned.fc1.out_features == 5


class ChannelsFirstLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias).permute(0, 3, 1, 2)


def test_a_norm_over_the_channels_prunes_them_with_its_weight_and_bias():
    """A channels-first LayerNorm (``F.layer_norm`` on its module's parameters): its channels prune with the
    conv producing them, its weight and bias sliced, ``normalized_shape`` following; a functional layer norm on a
    constant shape without a LayerNorm's parameters keeps its channels (the constant could not follow)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ChannelsFirstLayerNorm(8), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1))
    graph = ChannelGraph(randomized(model).eval(), torch.randn(2, 3, 4, 4))
    assert [g.layers for g in graph.groups] == [["0", "1", "2"], ["2", "3"]]
    pruned, _ = check(model, torch.randn(2, 3, 4, 4), graph=graph)
    assert pruned[1].normalized_shape == pruned[1].weight.shape == (pruned[0].out_channels,)

    class Fixed(nn.Module):
        def forward(self, x):
            return F.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        graph = ChannelGraph(nn.Sequential(nn.Conv2d(3, 8, 1), Fixed(), nn.Conv2d(8, 4, 1)), torch.randn(2, 3, 4, 4))
    assert graph.groups == [] and any("layer norm" in r for r in graph.share_unprunable()[1])


# ---------------------------------------------------------------------- 4. GroupNorm


class GroupNormed(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GroupNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, 12, 3, padding=1), nn.GroupNorm(4, 12)
        self.conv2, self.gn2 = nn.Conv2d(12, 8, 3, padding=1), GroupNormed(2, 8)
        self.conv3, self.gn3 = nn.Conv2d(8, 6, 1), nn.GroupNorm(3, 6, affine=False)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        s = F.relu(self.gn1(self.conv1(x)))
        s = F.relu(self.gn2(self.conv2(s)))
        return self.fc(F.relu(self.gn3(self.conv3(s))).mean((2, 3)))


def test_group_norm_groups_go_whole_and_num_groups_shrinks():
    torch.manual_seed(0)
    model, x = randomized(GroupNet()), torch.randn(2, 3, 8, 8)
    graph = ChannelGraph(model, x)
    assert [len(g.channels) for g in graph.groups] == [4, 2, 3]  # one channel per norm group
    pruned, _ = check(model, x)
    assert (pruned.gn1.num_groups, pruned.gn1.num_channels, pruned.conv1.out_channels) == (2, 6, 6)
    assert (pruned.gn2.num_groups, pruned.gn2.num_channels, pruned.gn2.weight.shape[0]) == (1, 4, 4)
    assert (pruned.gn3.num_groups, pruned.gn3.num_channels) == (2, 4)


# ---------------------------------------------------------------------- 5. split, chunk, slice, narrow


class Pieces(nn.Module):
    """Half the channels through a residual block (a partial residual add), a split whose size is computed at run
    time, slices with constant bounds."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.inner, self.bnh = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.mix = nn.Conv2d(8, 10, 1)
        self.tail1, self.tail2 = nn.Conv2d(8, 4, 1), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        s = F.relu(self.bn(self.stem(x)))
        a, b = s.chunk(2, 1)
        s = torch.cat([a + self.bnh(self.inner(a)), b], 1)
        c, d = torch.split(s, s.shape[1] // 2, 1)
        m = F.relu(self.mix(torch.cat([d, c], 1)))  # 10 channels: m[:, 2:] and narrow(m, 1, 0, 3) below
        t = self.tail1(m[:, 2:]) + self.tail2(torch.narrow(m, 1, 0, 3))
        return self.fc(t.mean((2, 3)))


def test_pieces_of_the_channels_follow_their_ranges():
    torch.manual_seed(0)
    model, x = randomized(Pieces()), torch.randn(2, 3, 8, 8)
    graph = ChannelGraph(model, x)
    sizes = {g.name: len(g.channels) for g in graph.groups}  # the inner conv writes into the stem's first half
    # the stem's 8 channels: channel j of both halves together (4); the mix's channels 0..2 are counted by the
    # constants (m[:, 2:] starts at 2, narrow takes 0..3): 3..9 stay prunable
    assert sizes == {"stem": 4, "mix": 7, "tail1": 4}
    pruned, _ = check(model, x)
    assert pruned.stem.out_channels == 4 and pruned.inner.in_channels == 2 and pruned.mix.out_channels == 7


class FixedSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(5, 4, 1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        p, q = torch.split(self.conv(x), [3, 5], 1)
        return self.head(F.relu(self.a(p) + self.b(q)))


def test_a_split_into_constant_sizes_keeps_its_channels():
    model, x = FixedSplit().eval(), torch.randn(2, 3, 4, 4)
    graph = ChannelGraph(model, x)
    assert [g.name for g in graph.groups] == ["a"]  # the conv's channels are counted by the constants
    check(model, x)


# ---------------------------------------------------------------------- 6. channel shuffle


class Shuffle(nn.Module):
    """Two convs concatenated, shuffled (groups 2, as ShuffleNet), a grouped conv over the result."""

    def __init__(self, groups_constant: bool = True):
        super().__init__()
        self.groups_constant = groups_constant
        self.a, self.bna = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b, self.bnb = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c, self.fc = nn.Conv2d(12, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        s = torch.cat([self.bna(self.a(x)), self.bnb(self.b(x))], 1)
        batch, channels, h, w = s.size()
        if self.groups_constant:
            s = s.view(batch, 2, channels // 2, h, w)
        else:  # a constant group width instead: whole groups (rows) go
            s = s.view(batch, channels // 3, 3, h, w)
        s = torch.transpose(s, 1, 2).contiguous().view(batch, channels, h, w)
        return self.fc(F.relu(self.c(F.relu(s))).mean((2, 3)))


@pytest.mark.parametrize("groups_constant", [True, False])
def test_a_channel_shuffle_permutes_the_channels(groups_constant):
    torch.manual_seed(0)
    model, x = randomized(Shuffle(groups_constant)), torch.randn(2, 3, 8, 8)
    graph = ChannelGraph(model, x)
    stream = next(g for g in graph.groups if "a" in g.layers)
    if groups_constant:  # a's channel j and b's channel j are one shuffle column
        assert sorted(stream.layers) == ["a", "b", "bna", "bnb", "c"] and len(stream.channels) == 6
    else:  # rows of 3: a's channels 0-2, 3-5, b's 0-2, 3-5
        assert len(stream.channels) == 2 and len(graph.groups) == 3
    pruned, _ = check(model, x)
    assert pruned.c.in_channels == 6  # half the columns (3 of 6) or rows (2 of 4) went


class OtherWays(nn.Module):
    """Pieces and grids read some other way than one piece at a time or a grid operation."""

    def __init__(self, way: str):
        super().__init__()
        self.way, self.a, self.b = way, nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        b, c, h, w = y.shape
        if self.way == "reversed pieces":  # a tuple of pieces, sliced, concatenated whole: followed
            y = torch.cat(y.chunk(2, 1)[::-1], 1)
        elif self.way == "stacked pieces":
            y = torch.stack(y.chunk(2, 1), 1).flatten(1, 2)
        else:  # a grid added to its flipped self
            g = y.view(b, 2, c // 2, h, w)
            y = (g + g.flip(2)).reshape(b, c, h, w)
        return self.b(F.relu(y))


@pytest.mark.parametrize("way", ["reversed pieces", "stacked pieces", "flipped grid"])
def test_pieces_and_grids_read_other_ways_are_followed_or_kept(way):
    torch.manual_seed(0)
    model, x = OtherWays(way).eval(), torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ChannelGraph(model, x)
    if way == "reversed pieces":  # channel j of both halves together
        assert [len(g.channels) for g in graph.groups] == [4] and not caught
        check(model, x, graph=graph)
    else:  # the conv's channels meet an operation the graph cannot map
        assert graph.groups == [] and any("cannot be mapped" in str(w.message) for w in caught)


# ---------------------------------------------------------------------- 7. upsampling


class Upsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.up, self.b = (
            nn.Conv2d(3, 6, 3, stride=2, padding=1),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(6, 6, 1),
        )
        self.c, self.fc = nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 5)

    def forward(self, x):
        s = self.b(self.up(F.relu(self.a(x))))
        s = F.interpolate(F.relu(s), scale_factor=0.5, mode="bilinear", align_corners=False)
        return self.fc(self.c(s).mean((2, 3)))


def test_upsampling_keeps_the_channels():
    torch.manual_seed(0)
    model, x = Upsampling().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = ChannelGraph(model, x)
    assert [len(g.channels) for g in graph.groups] == [6, 6, 4]
    check(model, x, graph=graph)


# ---------------------------------------------------------------------- 8. the concrete-input fallback


class SizeDependent(nn.Module):
    """Padding computed from the input size and an ``if`` on a shape: symbolic tracing cannot follow them."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3), nn.Linear(6, 5)

    def forward(self, x):
        if x.shape[-1] % 4:
            x = F.pad(x, (0, 4 - x.shape[-1] % 4, 0, 4 - x.shape[-2] % 4))
        s = F.relu(self.bn(self.a(x)))
        return self.fc(self.b(s).amax((2, 3)) if s.shape[-1] > 4 else s.mean((2, 3)))


def test_a_network_symbolic_tracing_cannot_follow_is_traced_on_the_example():
    torch.manual_seed(0)
    model, x = randomized(SizeDependent()), torch.randn(2, 3, 10, 10)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")  # amax over space is not mapped: the channels it reads stay
        graph = ChannelGraph(model, x)
    assert [len(g.channels) for g in graph.groups] == [8]
    pruned, _ = check(model, x, graph=graph)
    assert pruned.a.out_channels == 4 and pruned(torch.randn(1, 3, 12, 12)).shape == (1, 5)


def test_a_branch_on_the_data_is_still_refused_naming_the_module():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Gate())
    with pytest.raises(UserError) as e:
        ChannelGraph(model, torch.randn(1, 3, 4, 4))
    assert "1" in e.value.why and "\n" not in e.value.why


def test_prune_of_a_network_with_every_kind_of_operation():
    torch.manual_seed(0)
    model, x = randomized(Pieces()), torch.randn(2, 3, 8, 8)
    pruned, table = prune_cli.prune(model, x, 0.3)
    assert table["params_pruned"] == sum(p.numel() for p in pruned.parameters())
    assert table["params_removed"] > 0.1 and table["channels_removed"] > 0
    for mode in ("train", "eval"):
        assert getattr(pruned, mode)()(x).shape == (2, 5)
