"""Model families: ``build_model(arch)`` rebuilds any registered model from its ``arch`` dict."""

from __future__ import annotations

from . import resnet, vgg  # noqa: F401  (importing registers the built-in families)
from .base import MODELS, ChannelGroup, Prunable


def build_model(arch: dict) -> Prunable:
    """``arch`` = the model's ``arch`` dict (name, num_classes, in_channels, widths, ...)."""
    return MODELS.get(arch["name"])(**arch)


__all__ = ["MODELS", "ChannelGroup", "Prunable", "build_model"]
