"""Model families: ``build_model(arch)`` rebuilds any registered model from its ``arch`` dict."""

from __future__ import annotations

from prune_cli.models import graphnet
from prune_cli.models.base import MODELS, Prunable, build_model


def with_shared_groups(model: Prunable, input_shape: tuple[int, int, int]) -> Prunable:
    """``model`` (not copied) offering every channel group of its traced graph the stages can prune, those several
    layers share (residual streams, depthwise chains, concatenations) included."""
    return graphnet.GraphNet.around(model, input_shape)


__all__ = ["MODELS", "Prunable", "build_model", "with_shared_groups"]
