"""Plain networks: a chain of 3x3 conv (+ BatchNorm) + ReLU layers, global average pooling and one linear layer.

What RMNet's RM operation makes of a residual network (``prune_cli/methods/rmnet.py``): with no residual
coupling left, every conv's output channels form one channel group, pruned like VGG's. Built from per-conv
``widths`` and ``strides``; ``bn: false`` is the form with BatchNorm fused into the conv biases, where a channel
mask applies to the conv itself (its filter and bias zeroed is exactly the channel removed, after the ReLU).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.models.base import MODELS, Prunable
from prune_cli.models.resnet import init_weights
from prune_cli.structure.groups import ChannelGroup


@MODELS.register("plain")
class Plain(Prunable):
    @classmethod
    def options_for(cls, name: str):
        return ()

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int,
        widths: list[int] | None = None,
        strides: list[int] | None = None,
        bn: bool = True,
        width_mult: float = 1.0,
    ):
        super().__init__()
        if widths is None or strides is None or len(widths) != len(strides):
            raise UserError("model.name", "plain networks are made by the rm stage from a residual network")
        self.arch = dict(
            name=name,
            num_classes=num_classes,
            in_channels=in_channels,
            widths=list(widths),
            strides=list(strides),
            bn=bn,
            width_mult=width_mult,
        )
        layers, cin = [], in_channels
        for cout, stride in zip(widths, strides):
            layers.append(nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        self._step = 3 if bn else 2  # modules per layer in `features`
        init_weights(self)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    def channel_groups(self) -> list[ChannelGroup]:
        convs = [f"features.{k * self._step}" for k in range(len(self.arch["widths"]))]
        masks = [f"features.{k * self._step + 1}" for k in range(len(convs))] if self.arch["bn"] else convs
        consumers = convs[1:] + ["fc"]
        return [
            ChannelGroup(f"conv{k + 1}", c, m, (nxt,)) for k, (c, m, nxt) in enumerate(zip(convs, masks, consumers))
        ]

    def last_groups(self) -> set[int]:
        return {len(self.arch["widths"]) - 1}

    def segments(self):
        """One segment per layer (conv, BN, ReLU), then the head."""
        n, s = len(self.arch["widths"]), self._step
        segments = [(f"features.{k * s}", self.features[k * s : (k + 1) * s]) for k in range(n)]
        return segments + [("fc", lambda x: self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)))]
