"""Prune a network object of any design: ``prune_cli.prune(model, example_input, ratio=0.5)``.

The coupled channels come from the traced channel graph (``graph.py``). A channel's score is the sum over the
layers producing it (every conv / linear whose output rows it indexes) of that row's norm divided by the layer's
mean row norm, so layers of different scale compare (``normalize="mean"``; ``"none"`` sums raw norms). The
lowest-scoring channels go first, over the whole network (``scope="global"``) or share by share in every group
(``scope="group"``: the lowest 1/n of each group of n, then the next), until ``ratio`` of the ``target``
(channels, params or MACs, counted exactly from the graph) is removed; every group keeps at least ``min_channels``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from prune_cli.structure.graph import ChannelGraph
from prune_cli.structure.selection import check_target

CRITERIA = ("l1", "l2", "random")


def channel_scores(
    graph: ChannelGraph, criterion: str = "l1", normalize: str = "mean", seed: int = 0
) -> dict[int, float]:
    """channel id -> score (higher = more important) for every prunable channel."""
    prunable = [c for g in graph.groups for c in g.channels]
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return dict(zip(prunable, rng.random(len(prunable)).tolist()))
    scores = dict.fromkeys(prunable, 0.0)
    params = dict(graph.model.named_parameters())
    for (module, param), dims in graph.dims.items():
        if param != "weight" or 0 not in dims or not isinstance(graph.modules[module], nn.Conv2d | nn.Linear):
            continue
        w = params[f"{module}.{param}"].detach().flatten(1).float()
        norms = w.abs().sum(1) if criterion == "l1" else w.pow(2).sum(1).sqrt()
        if normalize == "mean":
            norms = norms / norms.mean().clamp_min(1e-12)
        for atom, value in zip(dims[0].tolist(), norms.tolist()):
            root = int(graph.root[atom])
            if root in scores:
                scores[root] += value
    return scores


def _order(graph: ChannelGraph, scores: dict[int, float], scope: str, min_channels: int) -> list[int]:
    """Removable channels in removal order: lowest score first over the whole network (global), or every group's
    lowest share first (group: a channel's key is its rank in its group over the group's size)."""
    key = {}
    for g in graph.groups:
        ranked = sorted(g.channels, key=lambda c: (scores[c], c))
        for i, c in enumerate(ranked[: max(0, len(ranked) - min_channels)]):
            key[c] = ((i + 1) / len(ranked), scores[c], c) if scope == "group" else (scores[c], c)
    return sorted(key, key=key.get)


def select(
    graph: ChannelGraph,
    ratio: float,
    target: str = "params",
    criterion: str = "l1",
    scope: str = "global",
    normalize: str = "mean",
    min_channels: int = 1,
    seed: int = 0,
) -> set[int]:
    """The channels to remove: the fewest lowest-scoring ones whose removal takes away ``ratio`` of ``target``."""
    check_target(target, ratio)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    order = _order(graph, channel_scores(graph, criterion, normalize, seed), scope, min_channels)
    total_channels = sum(len(g.channels) for g in graph.groups)
    dense = graph.count(set())

    def amount(k: int) -> float:
        """The share of the target removed with the first k channels of the order."""
        if target == "channels":
            return k / total_channels
        i = 0 if target == "params" else 1
        return 1 - graph.count(set(order[:k]))[i] / dense[i]

    if amount(len(order)) < ratio:
        raise ValueError(f"{ratio:.0%} of the {target} cannot be removed with min_channels={min_channels}")
    lo, hi = 0, len(order)  # the smallest prefix that reaches the ratio: amount(lo) < ratio <= amount(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if amount(mid) >= ratio else (mid, hi)
    return set(order[:hi])


def prune(model: nn.Module, example_input: torch.Tensor, ratio: float, **options) -> tuple[nn.Module, dict]:
    """``(pruned model, table)``: a copy of ``model`` without the channels :func:`select` picks with ``options``
    (target, criterion, scope, normalize, min_channels, seed; ``model`` is left as it was), and what happened:
    params and MACs before and after (exact counts), channels removed, groups, and the channels the graph could
    not prune with the reason for each."""
    graph = ChannelGraph(model, example_input)
    removed = select(graph, ratio, **options)
    pruned = graph.pruned(removed)
    (p0, m0), (p1, m1) = graph.count(set()), graph.count(removed)
    share, reasons = graph.share_unprunable()
    table = {
        "params": p0,
        "params_pruned": p1,
        "macs": m0,
        "macs_pruned": m1,
        "params_removed": 1 - p1 / p0,
        "macs_removed": 1 - m1 / m0 if m0 else 0.0,
        "channels": sum(len(g.channels) for g in graph.groups),
        "channels_removed": len(removed),
        "groups": len(graph.groups),
        "unprunable_share": share,
        "unprunable_reasons": reasons,
        "warnings": list(graph.warnings),
    }
    return pruned, table
