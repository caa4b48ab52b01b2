"""Prune a network object of any design: ``prune_cli.prune(model, example_input, ratio=0.5)``.

The coupled channels come from the traced channel graph (``graph.py``). A channel's score is the mean over the
layers producing it (every conv / linear whose output rows it indexes) of the sum of its rows' norms there divided
by the layer's mean such sum, so layers of different scale, streams written by many layers and units of many rows
(a grouped conv's group, an attention head) compare with a conv's channel (``normalize="mean"``; ``"none"``: raw
sums). The
lowest-scoring channels go first, over the whole network (``scope="global"``) or share by share in every group
(``scope="group"``: the lowest 1/n of each group of n, then the next), until ``ratio`` of the ``target``
(channels, params or MACs, counted exactly from the graph) is removed, by the pipeline's rule (the closest amount
whole channels reach, ``closest``); every group keeps at least ``min_channels``.

Attention layers (``attention.py``) lose whole heads (``attention="heads"``), one position of every head
(``"head_width"``) or nothing (``"none"``); a unit's score is the sum over its q, k and v rows of their norms,
divided by the packed projection's mean unit sum.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from prune_cli.core.errors import UserError, one_line
from prune_cli.structure.attention import MODES
from prune_cli.structure.graph import ChannelGraph
from prune_cli.structure.selection import check_target

CRITERIA = ("l1", "l2", "random")
SCOPES = ("global", "group")
NORMALIZE = ("mean", "none")
TOLERANCE = 1e-3  # relative, as ``prune.tolerance``'s default


def check_options(ratio, target, criterion, scope, normalize, min_channels, seed) -> None:
    """Refuse, naming the argument and its accepted values, any option this API would not honour as given."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise TypeError(f"ratio must be a number in (0, 1), got {type(ratio).__name__}")
    check_target(target, ratio)
    for name, value, accepted in (("criterion", criterion, CRITERIA), ("scope", scope, SCOPES)):
        if value not in accepted:
            raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    for name, value, least in (("min_channels", min_channels, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer >= {least}, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value}")


def check_example(model: nn.Module, example_input) -> None:
    """Refuse an example input the model cannot be traced on, naming the argument and why (the model runs on it
    once here, in eval mode, so a failure is one message rather than a torch.fx traceback)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(
            f"example_input must be one tensor (a batch of inputs), got {type(example_input).__name__}; "
            "networks of several inputs are not supported"
        )
    if example_input.device.type == "meta" or any(p.device.type == "meta" for p in model.parameters()):
        where = "example_input is" if example_input.device.type == "meta" else "the model's parameters are"
        raise ValueError(f"{where} on the meta device: scores and counts need real values (load the weights first)")
    param = next(model.parameters(), None)
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(example_input.to(param.device) if param is not None else example_input)
    except Exception as e:
        raise ValueError(
            f"example_input: the model does not run on an input of shape {tuple(example_input.shape)} ({one_line(e)})"
        ) from None
    finally:
        for m, training in modes:
            m.training = training


def channel_scores(
    graph: ChannelGraph, criterion: str = "l1", normalize: str = "mean", seed: int = 0
) -> dict[int, float]:
    """channel id -> score (higher = more important) for every prunable channel: the mean over the layers producing
    it of the sum of its rows' norms there (a conv's one row, a grouped conv's group, an attention head's q, k and
    v rows), divided by that layer's mean such sum (``normalize="mean"``)."""
    prunable = [c for g in graph.groups for c in g.channels]
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return dict(zip(prunable, rng.random(len(prunable)).tolist()))
    total, layers = dict.fromkeys(prunable, 0.0), dict.fromkeys(prunable, 0)
    params = dict(graph.model.named_parameters())
    for (module, param), dims in graph.dims.items():
        layer = param == "weight" and isinstance(graph.modules[module], nn.Conv2d | nn.Linear)
        heads = (module, param) in graph.inner and param.endswith("weight")  # an attention's packed q, k, v rows
        if 0 not in dims or not (layer or heads):
            continue
        w = params[f"{module}.{param}"].detach().flatten(1).float()
        norms = (w.abs().sum(1) if criterion == "l1" else w.pow(2).sum(1).sqrt()).cpu().double().numpy()
        units, inverse = np.unique(graph.root[dims[0]], return_inverse=True)
        sums = np.zeros(len(units))
        np.add.at(sums, inverse, norms)  # each channel's rows in this layer
        if normalize == "mean":
            sums = sums / max(float(sums.mean()), 1e-12)
        for root, value in zip(units.tolist(), sums.tolist()):
            if root in total:
                total[root] += value
                layers[root] += 1
    return {c: total[c] / max(layers[c], 1) for c in prunable}


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
    """The channels to remove: the lowest-scoring ones whose removal takes away the amount of ``target`` closest to
    ``ratio`` (within ``TOLERANCE * ratio`` where whole channels allow), as the pipeline selects."""
    check_options(ratio, target, criterion, scope, normalize, min_channels, seed)
    if not graph.groups:
        why = graph.warnings[0] if graph.warnings else "no conv or linear layer whose outputs another layer reads"
        raise ValueError(f"model: no channel can be pruned ({why})")
    order = _order(graph, channel_scores(graph, criterion, normalize, seed), scope, min_channels)
    total_channels = sum(len(g.channels) for g in graph.groups)
    dense = graph.count(set())

    def amount(chosen: list[int]) -> float:
        """The share of the target removed with the ``chosen`` channels."""
        if target == "channels":
            return len(chosen) / total_channels
        i = 0 if target == "params" else 1
        return 1 - graph.count(set(chosen))[i] / dense[i]

    if amount(order) < ratio * (1 - TOLERANCE):
        raise ValueError(f"{ratio:.0%} of the {target} cannot be removed with min_channels={min_channels}")
    return set(closest(order, amount, ratio, {c: g for g, group in enumerate(graph.groups) for c in group.channels}))


def closest(order: list[int], amount, ratio: float, group_of: dict[int, int]) -> list[int]:
    """The channels to remove by the selection engine's rule (docs/methods.md "Selection"): the longest prefix of
    ``order`` that does not pass ``ratio``; then each following channel that keeps the amount within
    ``ratio * (1 + TOLERANCE)`` until within the band; if still outside it, whichever lands closest of that, that
    plus the one channel more that passes the ratio by the least, and the ranking's next prefix. A channel's cost
    depends on its group alone, so a group whose next channel passed the band is not tried again."""
    lo, hi = 0, len(order)  # the largest k whose first k channels do not pass the ratio (amount grows with k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if amount(order[:mid]) <= ratio else (lo, mid - 1)
    chosen = order[:lo]
    now = amount(chosen)
    passed: dict[int, tuple[int, float]] = {}  # group -> (its next channel, the amount it reached)
    for c in order[lo:]:
        if abs(now - ratio) <= TOLERANCE * ratio:
            return chosen
        if group_of[c] in passed:
            continue
        with_c = amount([*chosen, c])
        if with_c <= ratio * (1 + TOLERANCE):
            chosen, now = [*chosen, c], with_c
        else:
            passed[group_of[c]] = (c, with_c)
    if abs(now - ratio) > TOLERANCE * ratio:  # short of the band: passing the ratio may land closer
        options = [(now, chosen)]
        if passed:  # the one channel more that passes the ratio by the least
            over = min(([*chosen, c] for c, _ in passed.values()), key=amount)
            options.append((amount(over), over))
        if lo < len(order):  # the ranking's next prefix, without the fill
            options.append((amount(order[: lo + 1]), order[: lo + 1]))
        chosen = min(options, key=lambda option: abs(option[0] - ratio))[1]  # ties: the first, below the ratio
    return chosen


SELECT_DEFAULTS = {
    "target": "params",
    "criterion": "l1",
    "scope": "global",
    "normalize": "mean",
    "min_channels": 1,
    "seed": 0,
    "attention": "heads",
}


def _known(options: dict) -> dict:
    """``options``, once every name is one :func:`select` takes."""
    unknown = sorted(set(options) - set(SELECT_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; the options are {', '.join(SELECT_DEFAULTS)}")
    return options


def prune(model: nn.Module, example_input: torch.Tensor, ratio: float, **options) -> tuple[nn.Module, dict]:
    """``(pruned model, table)``: a copy of ``model`` without the channels :func:`select` picks with ``options``
    (attention, target, criterion, scope, normalize, min_channels, seed; ``model`` is left as it was), and what
    happened:
    params and MACs before and after (exact counts), channels removed, groups, and the channels the graph could
    not prune with the reason for each.

    Bad arguments raise ``TypeError`` / ``ValueError`` naming the argument (unknown option values list the
    accepted ones); nothing is printed."""
    options = {**SELECT_DEFAULTS, **_known(options)}
    attention = options.pop("attention")
    check_options(ratio, **options)
    if attention not in MODES:
        raise ValueError(f"attention must be one of {MODES}, got {attention!r}")
    check_example(model, example_input)
    try:
        graph = ChannelGraph(model, example_input, attention)
    except UserError as e:  # the graph's one line, as the Python API's exception
        raise ValueError(str(e)) from None
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
