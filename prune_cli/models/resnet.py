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

from prune_cli.core.options import Bool, Choice
from prune_cli.models.base import MODELS, WIDTH_MULT, Prunable, scaled_widths
from prune_cli.models.layers import bn_affine
from prune_cli.structure.groups import ChannelGroup


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class PadShortcut(nn.Module):
    """Option A: subsample by the stride and zero-pad the new channels (no parameters)."""

    channel_padding = ("left", "right")  # the padding widths, lowered when padded stream channels are pruned

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.left, self.right = stride, (cout - cin) // 2, cout - cin - (cout - cin) // 2

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.left, self.right))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    With ``mid`` = 0 every internal channel is gone: the residual branch then adds ``bn2`` of zeros, the constant
    it computes with no channel left (exactly the masked block's), and the block costs no MACs. With ``outputs``
    (residual-branch output pruning, SCOP) conv2 computes only those stream channels and adds them in by index.
    """

    def __init__(self, cin: int, mid: int, cout: int, stride: int, shortcut: str, outputs: list[int] | None = None):
        super().__init__()
        self.mid, self.cout, self.outputs = mid, cout, outputs
        branch = cout if outputs is None else len(outputs)
        if mid:
            self.conv1, self.bn1 = conv3x3(cin, mid, stride), nn.BatchNorm2d(mid)
            self.conv2 = conv3x3(mid, branch)
        self.bn2 = nn.BatchNorm2d(branch)
        if outputs is not None:
            self.register_buffer("out_index", torch.tensor(outputs, dtype=torch.long), persistent=False)
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
        if isinstance(self.shortcut, nn.Sequential):
            conv, bn = self.shortcut
            scale, shift = bn_affine(bn)
            return conv.weight * scale.view(-1, 1, 1, 1), shift
        pad = isinstance(self.shortcut, PadShortcut)
        left, right = (self.shortcut.left, self.shortcut.right) if pad else (0, 0)
        cin = self.cout - left - right
        weight = torch.zeros(self.cout, cin, 1, 1, device=self.bn2.weight.device)
        weight[torch.arange(cin) + left, torch.arange(cin)] = 1.0
        return weight, torch.zeros(self.cout, device=weight.device)

    def forward(self, x):
        residual = self.shortcut(x)
        if self.mid:
            branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        else:
            shape = (residual.shape[0], self.bn2.num_features, *residual.shape[2:])
            branch = self.bn2(residual.new_zeros(shape))
        if self.outputs is None:
            return F.relu(residual + branch)
        return F.relu(residual.index_add(1, self.out_index, branch))


# name -> (blocks per stage, stage widths, shortcut, stem)
VARIANTS = {
    "resnet20": ((3, 3, 3), (16, 32, 64), "A", "cifar"),
    "resnet32": ((5, 5, 5), (16, 32, 64), "A", "cifar"),
    "resnet56": ((9, 9, 9), (16, 32, 64), "A", "cifar"),
    "resnet110": ((18, 18, 18), (16, 32, 64), "A", "cifar"),
    "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512), "B", "cifar"),
    "resnet34": ((3, 4, 6, 3), (64, 128, 256, 512), "B", "cifar"),
}


PRUNE_OUTPUTS = Bool(
    "prune_outputs",
    False,
    "residual-branch outputs are channel groups too: conv2 computes only the kept ones, added into the stream by "
    "index (SCOP)",
    absent=False,
)
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
        return (*options, PRUNE_OUTPUTS, WIDTH_MULT)

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int,
        widths: list[int] | None = None,
        width_mult: float = 1.0,
        shortcut: str | None = None,
        stem: str | None = None,
        prune_outputs: bool = False,
        outputs: list[list[int] | None] | None = None,
    ):
        super().__init__()
        blocks, base, default_shortcut, default_stem = VARIANTS[name]
        stage_widths = scaled_widths(name, base, width_mult)
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
            prune_outputs=prune_outputs,
            outputs=outputs,
        )
        if stem == "imagenet":  # 7x7/2 conv + 3x3/2 max-pool, as torchvision's ImageNet ResNets
            self.conv1 = nn.Conv2d(in_channels, stage_widths[0], 7, 2, 3, bias=False)
            self.pool = nn.MaxPool2d(3, 2, 1)
        else:  # 3x3/1 conv, no pooling: the CIFAR stem, also the usual one for 64x64 TinyImageNet
            self.conv1, self.pool = conv3x3(in_channels, stage_widths[0]), nn.Identity()
        self.bn1 = nn.BatchNorm2d(stage_widths[0])
        it, kept, cin, stages = iter(widths), iter(outputs or [None] * len(widths)), stage_widths[0], []
        for s, (n, cout) in enumerate(zip(blocks, stage_widths)):
            layer = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                layer.append(BasicBlock(cin, next(it), cout, stride, shortcut, next(kept)))
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

    def blocks(self) -> list[tuple[str, BasicBlock]]:
        return [(f"layers.{s}.{b}", block) for s, layer in enumerate(self.layers) for b, block in enumerate(layer)]

    def channel_groups(self) -> list[ChannelGroup]:
        """One group per block with internal channels (a block of width 0 is its shortcut plus a constant); with
        ``prune_outputs``, after it the block's residual-branch outputs (``<block>.out``: conv2's filters and bn2,
        no consumer: they are added into the stream by index)."""
        groups = []
        for name, block in self.blocks():
            if block.mid:
                groups.append(ChannelGroup(name, f"{name}.conv1", f"{name}.bn1", (f"{name}.conv2",)))
                if self.arch["prune_outputs"]:
                    groups.append(ChannelGroup(f"{name}.out", f"{name}.conv2", f"{name}.bn2", ()))
        return groups

    @property
    def widths(self) -> list[int]:
        return [self.get_submodule(g.conv).out_channels for g in self.channel_groups()]

    def removable_groups(self) -> set[int]:
        """Every block's internal channels: a block without them keeps its shortcut (and bn2's constant)."""
        return {g for g, group in enumerate(self.channel_groups()) if not group.name.endswith(".out")}

    def pruned_arch(self, index) -> dict:
        widths, outputs, it = [], [], iter(index)
        for _, block in self.blocks():
            kept = block.outputs
            if block.mid:
                widths.append(len(next(it)))
                if self.arch["prune_outputs"]:
                    old = block.outputs if block.outputs is not None else list(range(block.cout))
                    kept = [old[i] for i in next(it).tolist()]
            else:
                widths.append(0)
            outputs.append(kept)
        return {**self.arch, "widths": widths, "outputs": outputs if any(o is not None for o in outputs) else None}

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
        return stem + self.blocks() + [("fc", lambda x: self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)))]


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
