"""Model registry: ``build_model(arch)`` rebuilds any model from its ``arch`` dict."""
from __future__ import annotations

from .base import ChannelGroup, Prunable
from .resnet import VARIANTS as RESNETS, ResNet
from .vgg import CONFIGS as VGGS, VGG

MODEL_NAMES = sorted(RESNETS) + sorted(VGGS)


def build_model(arch: dict) -> Prunable:
    """``arch`` = the model's ``arch`` dict (name, num_classes, in_channels, widths, ...)."""
    arch = dict(arch)
    name = arch.pop("name")
    if name in RESNETS:
        return ResNet(name, **arch)
    if name in VGGS:
        return VGG(name, **arch)
    raise KeyError(name)


__all__ = ["ChannelGroup", "Prunable", "build_model", "MODEL_NAMES"]
