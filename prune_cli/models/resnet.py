"""ResNets built from per-block widths.

CIFAR ResNet-20/32/56/110 (He et al. 2016; 3 stages of 16/32/64 channels,
option-A zero-padding shortcuts by default) and ResNet-18/34 for 64x64
TinyImageNet (4 stages of 64..512, option-B 1x1 shortcuts). Only the internal
channels of a BasicBlock (conv1 out = conv2 in) are prunable: the block outputs
are tied to the residual stream of the stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..options import Choice
from .base import MODELS, WIDTH_MULT, ChannelGroup, Prunable


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class PadShortcut(nn.Module):
    """Option A: subsample by the stride and zero-pad the new channels (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.left, self.right = stride, (cout - cin) // 2, cout - cin - (cout - cin) // 2

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.left, self.right))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``. With ``mid`` = 0 every internal channel is gone:
    the residual branch then adds ``bn2`` of zeros, the constant it computes with no channel left (exactly the
    masked block's), and the block costs no MACs."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.mid = mid
        if mid:
            self.conv1, self.bn1 = conv3x3(cin, mid, stride), nn.BatchNorm2d(mid)
            self.conv2 = conv3x3(mid, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(cin, cout, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def shortcut_as_conv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shortcut in eval mode as a 1x1 conv on the block input subsampled by the block's stride:
        (weight [cout, cin, 1, 1], bias [cout]). Identity and option A are 0/1 matrices, option B its conv with
        the BatchNorm folded in."""
        cout = self.bn2.num_features
        if isinstance(self.shortcut, nn.Sequential):
            conv, bn = self.shortcut
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            return conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale
        pad = isinstance(self.shortcut, PadShortcut)
        left, right = (self.shortcut.left, self.shortcut.right) if pad else (0, 0)
        cin = cout - left - right
        weight = torch.zeros(cout, cin, 1, 1, device=self.bn2.weight.device)
        weight[torch.arange(cin) + left, torch.arange(cin)] = 1.0
        return weight, torch.zeros(cout, device=weight.device)

    def forward(self, x):
        if not self.mid:
            residual = self.shortcut(x)
            return F.relu(self.bn2(torch.zeros_like(residual)) + residual)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


# name -> (blocks per stage, stage widths, shortcut, stem)
VARIANTS = {
    "resnet20": ((3, 3, 3), (16, 32, 64), "A", "cifar"),
    "resnet32": ((5, 5, 5), (16, 32, 64), "A", "cifar"),
    "resnet56": ((9, 9, 9), (16, 32, 64), "A", "cifar"),
    "resnet110": ((18, 18, 18), (16, 32, 64), "A", "cifar"),
    "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512), "B", "cifar"),
    "resnet34": ((3, 4, 6, 3), (64, 128, 256, 512), "B", "cifar"),
}


SHORTCUT_DOC = "A: stride-2 subsample + zero-pad channels (the CIFAR papers' choice); B: 1x1 conv + BN"
STEM = Choice(
    "stem",
    "cifar",
    ("cifar", "imagenet"),
    "cifar: 3x3/1 conv, no pooling (usual for 64x64 inputs); imagenet: 7x7/2 conv + max-pool",
)


@MODELS.register(*VARIANTS)
class ResNet(Prunable):
    """``widths`` lists the internal width of every block, in forward order."""

    @classmethod
    def options_for(cls, name: str):
        _, _, shortcut, _ = VARIANTS[name]
        options = (Choice("shortcut", shortcut, ("A", "B"), SHORTCUT_DOC),)
        if shortcut == "B":  # the TinyImageNet ResNets also choose their stem
            options += (STEM,)
        return (*options, WIDTH_MULT)

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int,
        widths: list[int] | None = None,
        width_mult: float = 1.0,
        shortcut: str | None = None,
        stem: str | None = None,
    ):
        super().__init__()
        blocks, base, default_shortcut, default_stem = VARIANTS[name]
        stage_widths = [max(1, round(w * width_mult)) for w in base]
        shortcut, stem = shortcut or default_shortcut, stem or default_stem
        if widths is None:
            widths = [w for n, w in zip(blocks, stage_widths) for _ in range(n)]
        self.arch = dict(
            name=name,
            num_classes=num_classes,
            in_channels=in_channels,
            widths=list(widths),
            width_mult=width_mult,
            shortcut=shortcut,
            stem=stem,
        )
        if stem == "imagenet":  # 7x7/2 conv + 3x3/2 max-pool, as torchvision's ImageNet ResNets
            self.conv1 = nn.Conv2d(in_channels, stage_widths[0], 7, 2, 3, bias=False)
            self.pool = nn.MaxPool2d(3, 2, 1)
        else:  # 3x3/1 conv, no pooling: the CIFAR stem, also the usual one for 64x64 TinyImageNet
            self.conv1, self.pool = conv3x3(in_channels, stage_widths[0]), nn.Identity()
        self.bn1 = nn.BatchNorm2d(stage_widths[0])
        it, cin, stages = iter(widths), stage_widths[0], []
        for s, (n, cout) in enumerate(zip(blocks, stage_widths)):
            layer = []
            for b in range(n):
                layer.append(BasicBlock(cin, next(it), cout, 2 if (s > 0 and b == 0) else 1, shortcut))
                cin = cout
            stages.append(nn.Sequential(*layer))
        self.layers = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        for layer in self.layers:
            x = layer(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def channel_groups(self) -> list[ChannelGroup]:
        """One group per block with internal channels (a block of width 0 is its shortcut plus a constant)."""
        return [
            ChannelGroup(f"layers.{s}.{b}", f"layers.{s}.{b}.conv1", f"layers.{s}.{b}.bn1", (f"layers.{s}.{b}.conv2",))
            for s, layer in enumerate(self.layers)
            for b, block in enumerate(layer)
            if block.mid
        ]

    def removable_groups(self) -> set[int]:
        return set(range(len(self.widths)))

    def residual_layout(self):
        """(stem conv, stem BN, every BasicBlock in order, fc): what RMNet's RM operation turns into a plain
        network; None when the stem max-pools (a plain network has no pooling layer)."""
        if not isinstance(self.pool, nn.Identity):
            return None
        return self.conv1, self.bn1, [block for layer in self.layers for block in layer], self.fc

    def shortcut_convs(self) -> list[str]:
        return [
            f"{name}.0"
            for name, m in self.named_modules()
            if name.endswith("shortcut") and isinstance(m, nn.Sequential)
        ]

    def segments(self):
        """Stem, every BasicBlock ``layers.s.b``, head."""
        stem = [("conv1", lambda x: self.pool(F.relu(self.bn1(self.conv1(x)))))]
        blocks = [(f"layers.{s}.{b}", block) for s, layer in enumerate(self.layers) for b, block in enumerate(layer)]
        return stem + blocks + [("fc", lambda x: self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)))]


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs and linears, BN gamma=1 beta=0 (He et al.)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(
                m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in", nonlinearity="relu"
            )
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
