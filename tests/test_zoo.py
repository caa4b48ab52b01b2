"""Every classification family of torchvision, built from its class at reduced depth and width: half its params
pruned by ``prune_cli.prune`` gives a network equal to the masked one (the same selection, every traced tensor
zeroed at the removed channels, no surgery) in eval and in train mode, whose params and MACs equal a count from
its layers' shapes. scripts/zoo.py runs the full-size smallest variants; this is its quick check."""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch
from torch import nn
from torchvision import models as M
from torchvision.models.efficientnet import FusedMBConvConfig, MBConvConfig
from torchvision.models.mobilenetv3 import InvertedResidualConfig
from torchvision.models.regnet import BlockParams
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import StochasticDepth

import prune_cli
from helpers import TINY, compose_config, layer_macs, randomized
from prune_cli.run import pipeline
from prune_cli.structure.any_network import select
from prune_cli.structure.graph import ChannelGraph

GOOGLENET = importlib.import_module("torchvision.models.googlenet")  # the module: M.googlenet is its builder
INCEPTION = importlib.import_module("torchvision.models.inception")
LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)  # those holding params


def small_classifier(features: int) -> nn.Sequential:
    """AlexNet's and VGG's head (dropout, linear, ReLU, twice, then the logits) at 32 units instead of 4096."""
    return nn.Sequential(
        nn.Dropout(), nn.Linear(features, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )


def with_small_classifier(build, features: int) -> nn.Module:
    """``build()``'s network with the small head: built on the meta device (its 4096-wide head is not worth
    allocating), the head replaced, then every layer allocated and initialised."""
    with torch.device("meta"):
        model = build()
        model.classifier = small_classifier(features)
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def alexnet() -> nn.Module:
    return with_small_classifier(lambda: M.AlexNet(num_classes=10), 256 * 6 * 6)


def vgg(batch_norm: bool) -> nn.Module:
    features = M.vgg.make_layers([8, "M", 16, "M", 16, 16, "M"], batch_norm=batch_norm)
    return with_small_classifier(lambda: M.VGG(features, num_classes=10, init_weights=False), 16 * 7 * 7)


def narrow(conv_class):
    """A conv-BN-ReLU factory for GoogLeNet's and Inception-v3's blocks at an eighth of every width given to it
    (the image's 3 channels stay): the blocks keep their branches, concatenations and pass-through pooling."""

    def make(in_channels: int, out_channels: int, **kwargs) -> nn.Module:
        return conv_class(in_channels if in_channels == 3 else in_channels // 8, out_channels // 8, **kwargs)

    return make


def googlenet() -> nn.Module:
    """GoogLeNet at an eighth of its widths, both auxiliary heads on (their linear layers sized to match)."""
    conv = narrow(GOOGLENET.BasicConv2d)
    blocks = [conv, partial(GOOGLENET.Inception, conv_block=conv), partial(GOOGLENET.InceptionAux, conv_block=conv)]
    model = M.GoogLeNet(num_classes=10, aux_logits=True, init_weights=False, blocks=blocks)
    model.fc = nn.Linear(1024 // 8, 10)
    for aux in (model.aux1, model.aux2):
        aux.fc1, aux.fc2 = nn.Linear(128 // 8 * 4 * 4, 32), nn.Linear(32, 10)
    return model


def inception() -> nn.Module:
    """Inception-v3 at an eighth of its widths, the auxiliary head on (its linear layer sized to match)."""
    conv = narrow(INCEPTION.BasicConv2d)
    blocks = [getattr(INCEPTION, f"Inception{kind}") for kind in ("A", "B", "C", "D", "E", "Aux")]
    model = M.Inception3(
        num_classes=10,
        aux_logits=True,
        init_weights=False,
        inception_blocks=[conv] + [partial(b, conv_block=conv) for b in blocks],
    )
    model.fc, model.AuxLogits.fc = nn.Linear(2048 // 8, 10), nn.Linear(768 // 8, 10)
    return model


def efficientnet() -> nn.Module:
    """MBConv blocks (depthwise, squeeze-excitation, stochastic depth) and a fused one, as in EfficientNetV2."""
    setting = [
        FusedMBConvConfig(1, 3, 1, 8, 8, 1),
        FusedMBConvConfig(2, 3, 2, 8, 16, 1),
        MBConvConfig(1, 3, 1, 16, 16, 1),
        MBConvConfig(4, 5, 2, 16, 24, 2),
    ]
    return M.EfficientNet(setting, dropout=0.2, num_classes=10, last_channel=48)


def mobilenet_v3() -> nn.Module:
    """Inverted residuals with and without squeeze-excitation, ReLU and hard-swish, a dilated one."""
    setting = [
        InvertedResidualConfig(8, 3, 8, 8, True, "RE", 2, 1, 1.0),
        InvertedResidualConfig(8, 3, 24, 16, False, "RE", 2, 1, 1.0),
        InvertedResidualConfig(16, 5, 48, 16, True, "HS", 1, 1, 1.0),
        InvertedResidualConfig(16, 3, 48, 24, True, "HS", 1, 2, 1.0),
    ]
    return M.MobileNetV3(setting, last_channel=64, num_classes=10)


def regnet() -> nn.Module:
    """Grouped bottlenecks (conv groups of 4 channels) with squeeze-excitation, as regnet_y."""
    params = BlockParams([1, 2], [16, 32], [4, 8], [1.0, 1.0], [2, 2], se_ratio=0.25)
    return M.RegNet(params, num_classes=10, stem_width=8)


NETWORKS = {  # family -> (the network at reduced size, its input side)
    "alexnet": (alexnet, 63),
    "densenet": (lambda: M.DenseNet(8, (1, 1, 1, 1), 16, bn_size=2, num_classes=10), 32),
    "efficientnet": (efficientnet, 32),
    "googlenet": (googlenet, 32),
    "inception": (inception, 299),  # its auxiliary head needs 17x17 maps: 299 is the least in train mode
    "mnasnet": (lambda: M.MNASNet(0.25, num_classes=10), 32),
    "mobilenet_v2": (lambda: M.MobileNetV2(10, 0.25, [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 1, 2]]), 32),
    "mobilenet_v3": (mobilenet_v3, 32),
    "regnet": (regnet, 32),
    "resnet": (lambda: M.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10), 32),
    "resnext": (lambda: M.ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=4, width_per_group=4), 32),
    "shufflenet_v2": (lambda: M.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=10), 32),
    "squeezenet": (lambda: M.SqueezeNet("1_1", num_classes=10), 32),
    "vgg": (lambda: vgg(batch_norm=False), 32),
    "vgg_bn": (lambda: vgg(batch_norm=True), 32),
}


def prepared(family: str) -> nn.Module:
    """The family's network with random BN statistics and affines (so every channel changes the output) and no
    randomness in train mode (dropout and stochastic depth off), in eval mode."""
    torch.manual_seed(0)
    model = NETWORKS[family][0]()
    for m in model.modules():
        if isinstance(m, nn.Dropout | StochasticDepth):
            m.p = 0.0
    return randomized(model)


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's output tensors (the logits, then any auxiliary heads' in train mode)."""
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, tuple) else [out]


def shape_count(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Params: every parameter of the conv, linear and norm layers (none lives elsewhere). MACs: ``layer_macs``."""
    params = sum(p.numel() for m in model.modules() if isinstance(m, LAYERS) for p in m.parameters(recurse=False))
    return params, layer_macs(model, x)


@pytest.mark.parametrize("family", NETWORKS)
def test_half_the_params_pruned_equals_masked_and_counts_match(family):
    torch.set_num_threads(1)
    model = prepared(family)
    side = NETWORKS[family][1]
    x = torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(2))
    pruned, table = prune_cli.prune(model, x, 0.5, target="params")
    assert abs(table["params_removed"] - 0.5) < 0.01
    graph = ChannelGraph(model, x)
    masked = graph.masked(select(graph, 0.5, target="params"))
    for mode in ("eval", "train"):  # train: BatchNorm normalises by the batch's statistics
        got, expected = outputs(getattr(pruned, mode)(), x), outputs(getattr(masked, mode)(), x)
        assert len(got) == len(expected), (
            f"{family}, {mode} mode: {len(got)} outputs, the masked network's {len(expected)}"
        )
        for a, b in zip(got, expected):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max(), f"{family}, {mode} mode"
    assert (table["params"], table["macs"]) == shape_count(model, x)
    assert (table["params_pruned"], table["macs_pruned"]) == shape_count(pruned, x)
    assert sum(p.numel() for p in model.parameters()) == table["params"]  # no parameter outside those layers


def test_the_pipelines_surgery_keeps_what_a_network_checks_on_loading(tmp_path):
    """MNASNet refuses a state dict without its version (``_metadata``): the prune stage's surgery, which loads the
    kept tensors into the smaller network, must keep it (scripts/zoo.py found the command line failing there)."""
    cfg = compose_config(*TINY, "model=torchvision", "model.network=mnasnet0_5", "schedule.stages=[prune]")
    rows = pipeline.run(cfg, tmp_path)
    assert [r["stage"] for r in rows] == ["init", "prune"]
    assert abs(1 - rows[1]["params"] / rows[0]["params"] - 0.5) < 0.01
    model, meta = prune_cli.load(tmp_path)  # the checkpoint rebuilds: the versions survived saving and loading
    assert meta["params"] == rows[1]["params"] == sum(p.numel() for p in model.parameters())
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
