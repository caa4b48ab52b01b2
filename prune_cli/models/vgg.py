"""CIFAR VGG-11/13/16/19 with BatchNorm, built from per-conv widths.

Every conv is prunable; the last conv's channels feed the classifier, whose
input shrinks with them. Heads: ``linear`` (one 512->classes layer, as in
Network Slimming and HGSR's "VGG14") or ``li`` (512-512-classes with BN, the
CIFAR VGG-16 of Li et al., ICLR 2017). ``last_maxpool: false`` drops the
max-pool after the last conv block (Neuron Merging's VGG-16: the global average
pool then takes the 2x2 map of a 32x32 image); the MACs are the same.
"""

from __future__ import annotations

from torch import nn

from prune_cli.core.options import Bool, Choice
from prune_cli.models.base import MODELS, WIDTH_MULT, Prunable, scaled_widths
from prune_cli.models.resnet import init_weights
from prune_cli.structure.groups import ChannelGroup

M = "M"  # 2x2 max-pool
CONFIGS = {
    "vgg11": [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
    "vgg13": [64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
    "vgg16": [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M],
    "vgg19": [64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M, 512, 512, 512, 512, M],
}


@MODELS.register(*CONFIGS)
class VGG(Prunable):
    @classmethod
    def options_for(cls, name: str):
        head = Choice(
            "head",
            "linear",
            ("linear", "li"),
            "linear: one 512->classes layer; li: 512-512-classes with BN (Li et al. ICLR 2017)",
        )
        last_maxpool = Bool(
            "last_maxpool",
            True,
            "false: no max-pool after the last conv block, the average pool takes its map (Neuron Merging's VGG-16)",
            absent=True,
        )
        return (head, last_maxpool, WIDTH_MULT)

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int,
        widths: list[int] | None = None,
        width_mult: float = 1.0,
        head: str = "linear",
        last_maxpool: bool = True,
    ):
        super().__init__()
        layout = CONFIGS[name] if last_maxpool else CONFIGS[name][:-1]
        if widths is None:
            widths = scaled_widths(name, [w for w in layout if w != M], width_mult)
        self.arch = dict(
            name=name,
            num_classes=num_classes,
            in_channels=in_channels,
            widths=list(widths),
            width_mult=width_mult,
            head=head,
            last_maxpool=last_maxpool,
        )
        layers, it, cin = [], iter(widths), in_channels
        self._convs: list[int] = []  # index in `features` of every conv
        for item in layout:
            if item == M:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))  # ceil: small inputs (8x8, 28x28) still fit
                continue
            cout = next(it)
            self._convs.append(len(layers))
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # a no-op at 32x32 (1x1 left); pools 64x64 inputs
        if head == "li":
            self.classifier = nn.Sequential(
                nn.Linear(cin, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
            )
        else:
            self.classifier = nn.Sequential(nn.Linear(cin, num_classes))
        init_weights(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def channel_groups(self) -> list[ChannelGroup]:
        convs = [f"features.{i}" for i in self._convs]
        consumers = convs[1:] + ["classifier.0"]
        # named conv1..convN as in the papers ("conv1 and conv8-13 pruned 50%")
        return [
            ChannelGroup(f"conv{k + 1}", c, f"features.{i + 1}", (nxt,))
            for k, (i, c, nxt) in enumerate(zip(self._convs, convs, consumers))
        ]

    def last_groups(self) -> set[int]:
        return {len(self._convs) - 1}

    def segments(self):
        """One segment per conv (``features.i`` up to the next conv: conv, BN, ReLU, pool), then the head."""
        starts = list(self._convs)
        cuts = ([0] if starts[0] != 0 else []) + starts + [len(self.features)]
        segments = [(f"features.{a}", self.features[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        return segments + [("classifier", lambda x: self.classifier(self.pool(x).flatten(1)))]
