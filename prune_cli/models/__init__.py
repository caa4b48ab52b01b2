"""Model families: ``build_model(arch)`` rebuilds any registered model from its ``arch`` dict."""

from __future__ import annotations

from . import graphnet, plain, resnet, vgg  # noqa: F401  (importing registers the built-in families)
from .base import MODELS, ChannelGroup, Prunable
from .layers import KINDS, apply_layers


def build_model(arch: dict) -> Prunable:
    """``arch`` = the model's ``arch`` dict (name, num_classes, in_channels, widths, ...), including the
    layer changes methods recorded in it (``layers.KINDS``: skeletons, factors, stripes)."""
    model = MODELS.get(arch["name"])(**{k: v for k, v in arch.items() if k not in KINDS})
    return apply_layers(model, arch)


def with_shared_groups(model: Prunable, input_shape: tuple[int, int, int]) -> Prunable:
    """``model`` (not copied) offering every channel group of its traced graph the stages can prune, those several
    layers share (residual streams, depthwise chains, concatenations) included."""
    return graphnet.GraphNet.around(model, input_shape)


__all__ = ["MODELS", "ChannelGroup", "Prunable", "build_model", "with_shared_groups"]
