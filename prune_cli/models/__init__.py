"""Model families: ``build_model(arch)`` rebuilds any registered model from its ``arch`` dict."""

from __future__ import annotations

from prune_cli.models import graphnet
from prune_cli.models.base import MODELS, Prunable, build_model


def with_shared_groups(model: Prunable, input_shape: tuple[int, int, int], attention: str = "heads") -> Prunable:
    """``model`` (not copied) offering every channel group of its traced graph the stages can prune, those several
    layers share (residual streams, depthwise chains, concatenations) included, attention layers by ``attention``
    (``prune.attention``: whole heads, head width, or none)."""
    return graphnet.GraphNet.around(model, input_shape, attention)


def offers_shared_groups(model: Prunable, residual) -> bool:
    """Whether ``prune.residual`` (``auto`` | true | false) gives ``model`` every group of its traced graph:
    ``auto`` does for a traced network (torchvision, custom, or one pruned so before), not for a built-in family,
    whose papers prune block-internal channels."""
    return residual is True or (residual == "auto" and isinstance(model, graphnet.GraphNet))


def pruned_groups(model: Prunable, input_shape: tuple[int, int, int], residual, attention: str = "heads") -> Prunable:
    """``model`` (not copied) with the channel groups a run with ``prune.residual`` and ``prune.attention`` prunes."""
    if not offers_shared_groups(model, residual):
        return model
    return with_shared_groups(model, input_shape, attention)


__all__ = ["MODELS", "Prunable", "build_model", "offers_shared_groups", "pruned_groups", "with_shared_groups"]
