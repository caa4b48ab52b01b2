"""Prune a network object of any design: ``prune_cli.prune(model, example_input, ratio=0.5)``.

The coupled channels come from the traced channel graph (``graph.py``). A channel's score is the mean over the
layers producing it (every conv / linear whose output rows it indexes) of the sum of its rows' norms there divided
by the layer's mean such sum, so layers of different scale, streams written by many layers and units of many rows
(a grouped conv's group, an attention head) compare with a conv's channel (``normalize="mean"``; ``"none"``: raw
sums). The
lowest-scoring channels go first, over the whole network (``scope="global"``) or share by share in every group
(``scope="group"``: the lowest 1/n of each group of n, then the next), until ``ratio`` of the ``target``
(channels, params or MACs, counted exactly from the graph, or the latency at ``latency_batch`` predicted by a cost
model measured on the model's device, ``cost_model.py``) is removed, by the pipeline's rule (the closest amount
whole channels reach, ``closest``); every group keeps at least ``min_channels``, and with ``round_to`` N every
pruned group a multiple of N (its channels go in blocks, ``selection.blocks``).

Attention layers (``attention.py``) lose whole heads (``attention="heads"``), one position of every head
(``"head_width"``) or nothing (``"none"``); a unit's score is the sum over its q, k and v rows of their norms,
divided by the packed projection's mean unit sum.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from prune_cli.core.errors import UserError, one_line
from prune_cli.structure import cost_model
from prune_cli.structure.attention import MODES
from prune_cli.structure.graph import ChannelGraph
from prune_cli.structure.selection import blocks, check_target

CRITERIA = ("l1", "l2", "random")
SCOPES = ("global", "group")
NORMALIZE = ("mean", "none")
TOLERANCE = 1e-3  # relative, as ``prune.tolerance``'s default


def check_options(
    ratio, target, criterion, scope, normalize, min_channels, seed, round_to=1, latency_batch=1, latency_cache=None
) -> None:
    """Refuse, naming the argument and its accepted values, any option this API would not honour as given."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise TypeError(f"ratio must be a number in (0, 1), got {type(ratio).__name__}")
    check_target(target, ratio)
    for name, value, accepted in (("criterion", criterion, CRITERIA), ("scope", scope, SCOPES)):
        if value not in accepted:
            raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if latency_cache is not None and not isinstance(latency_cache, str | os.PathLike):
        raise TypeError(f"latency_cache must be a directory path or None, got {type(latency_cache).__name__}")
    for name, value, least in (
        ("min_channels", min_channels, 0),
        ("seed", seed, 0),
        ("round_to", round_to, 1),
        ("latency_batch", latency_batch, 1),
    ):
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


def _order(graph: ChannelGraph, scores: dict[int, float], scope: str, min_channels: int, round_to: int) -> list:
    """Removable blocks of channels (tuples; one channel each, or with ``round_to`` those taking a group to its next
    multiple below) in removal order: lowest score first over the whole network (global), or every group's lowest
    share first (group: a channel's key is its rank in its group over the group's size); a block's key is its
    channels' mean."""
    key = {}
    for g in graph.groups:
        ranked = sorted(g.channels, key=lambda c: (scores[c], c))
        for first, last in blocks(len(ranked), min_channels, round_to):
            block = tuple(ranked[first:last])
            ranks = [(i + 1) / len(ranked) for i in range(first, last)]
            mean = float(np.mean([scores[c] for c in block]))
            key[block] = (float(np.mean(ranks)), mean, block[0]) if scope == "group" else (mean, block[0])
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
    round_to: int = 1,
    cost: cost_model.CostModel | None = None,
) -> set[int]:
    """The channels to remove: the lowest-scoring ones whose removal takes away the amount of ``target`` closest to
    ``ratio`` (within ``TOLERANCE * ratio`` where whole channels allow), as the pipeline selects. ``target="latency"``
    needs the ``cost`` model; a latency share out of reach removes every removable channel (the fastest reachable)."""
    check_options(ratio, target, criterion, scope, normalize, min_channels, seed, round_to)
    if not graph.groups:
        why = graph.warnings[0] if graph.warnings else "no conv or linear layer whose outputs another layer reads"
        raise ValueError(f"model: no channel can be pruned ({why})")
    order = _order(graph, channel_scores(graph, criterion, normalize, seed), scope, min_channels, round_to)
    amount = _amount(graph, target, cost)
    if amount(order) < ratio * (1 - TOLERANCE):
        if target == "latency":
            return {c for block in order for c in block}
        raise ValueError(f"{ratio:.0%} of the {target} cannot be removed with min_channels={min_channels}")
    group_of = {c: g for g, group in enumerate(graph.groups) for c in group.channels}
    return {c for block in closest(order, amount, ratio, {b: group_of[b[0]] for b in order}) for c in block}


def _amount(graph: ChannelGraph, target: str, cost: cost_model.CostModel | None):
    """The share of ``target`` that removing the chosen blocks of channels takes away."""
    total_channels = sum(len(g.channels) for g in graph.groups)
    dense = graph.count(set())
    full = predicted(graph, cost, set()) if target == "latency" else None

    def amount(chosen: list[tuple[int, ...]]) -> float:
        removed = {c for block in chosen for c in block}
        if target == "channels":
            return len(removed) / total_channels
        if target == "latency":
            return 1 - predicted(graph, cost, removed) / full
        i = 0 if target == "params" else 1
        return 1 - graph.count(removed)[i] / dense[i]

    return amount


def predicted(graph: ChannelGraph, cost: cost_model.CostModel, removed: set[int], stairs: bool = True) -> float:
    """The cost model's milliseconds for the network without the ``removed`` channels (``stairs``: as the
    selection prices them; else as those widths run)."""
    dims = {}
    for name in cost.layers:
        shape = graph.kept_shape(name, "weight", removed)
        dims[name] = (shape[1], shape[0])
    return cost.predict(dims, stairs)


def given_back(graph: ChannelGraph, cost: cost_model.CostModel, removed: set[int], scores: dict, step: int) -> set:
    """``removed`` less what ``cost_model.give_back`` gives back: a group stopped short of a multiple of 8 that runs
    faster gets back its best-scoring removed channels."""
    dense = [len(g.channels) for g in graph.groups]
    gone = [sorted((c for c in g.channels if c in removed), key=lambda c: (-scores[c], c)) for g in graph.groups]
    kept = [d - len(x) for d, x in zip(dense, gone)]

    def without(widths) -> set[int]:
        return removed - {c for g, w in enumerate(widths) for c in gone[g][: w - kept[g]]}

    widths = cost_model.give_back(kept, dense, lambda w: predicted(graph, cost, without(w), stairs=False), step)
    return without(widths)


def closest(order: list, amount, ratio: float, group_of: dict) -> list:
    """The channels to remove by the selection engine's rule (docs/methods.md "Selection"): the longest prefix of
    ``order`` (of blocks of channels) that does not pass ``ratio``; then each following block that keeps the amount
    within ``ratio * (1 + TOLERANCE)`` until within the band; if still outside it, whichever lands closest of that,
    that plus the one block more that passes the ratio by the least, and the ranking's next prefix. A block's cost
    depends on its group alone, so a group whose next block passed the band is not tried again."""
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
    "round_to": 1,
    "latency_batch": 1,
    "latency_cache": None,
}


def _known(options: dict) -> dict:
    """``options``, once every name is one :func:`select` takes."""
    unknown = sorted(set(options) - set(SELECT_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; the options are {', '.join(SELECT_DEFAULTS)}")
    return options


def prune(model: nn.Module, example_input: torch.Tensor, ratio: float, **options) -> tuple[nn.Module, dict]:
    """``(pruned model, table)``: a copy of ``model`` without the channels :func:`select` picks with ``options``
    (attention, target, criterion, scope, normalize, min_channels, seed, round_to, latency_batch, latency_cache;
    ``model`` is left as it was), and what happened: params and MACs before and after (exact counts), channels
    removed, groups, and the channels the graph could not prune with the reason for each. With
    ``target="latency"`` the selection's widths are given back where faster (``given_back``), it is aimed at the
    clock (``cost_model.aim``), and the table adds the latency at ``latency_batch`` predicted (of the widths as
    they run) and measured (dense and pruned, timed together on the model's device), the share asked of the
    selection, the share it reached by its own prices and the selections timed, the cost model's build time, and a
    warning when the share is out of reach (every removable channel then goes: the fastest reachable).

    Bad arguments raise ``TypeError`` / ``ValueError`` naming the argument (unknown option values list the
    accepted ones); nothing is printed."""
    options = {**SELECT_DEFAULTS, **_known(options)}
    attention, batch, cache = options.pop("attention"), options.pop("latency_batch"), options.pop("latency_cache")
    check_options(ratio, **options, latency_batch=batch, latency_cache=cache)
    if attention not in MODES:
        raise ValueError(f"attention must be one of {MODES}, got {attention!r}")
    check_example(model, example_input)
    try:
        graph = ChannelGraph(model, example_input, attention)
    except UserError as e:  # the graph's one line, as the Python API's exception
        raise ValueError(str(e)) from None
    shape, cost, aimed = tuple(example_input.shape[1:]), None, {}
    if options["target"] == "latency":  # priced by the cost model, then aimed at the clock
        cost = latency_model(graph, example_input, batch, cache, options["round_to"])
        timer = cost_model.DeviceTimer(cost.setting)
        scores = channel_scores(graph, options["criterion"], options["normalize"], options["seed"])
        full = predicted(graph, cost, set())

        def select_at(share: float) -> tuple[set[int], float]:  # (given back, the share the selection reached)
            gone = select(graph, share, **options, cost=cost)
            return given_back(graph, cost, gone, scores, options["round_to"]), 1 - predicted(graph, cost, gone) / full

        (removed, selected), asked, timed = cost_model.aim(
            ratio, select_at, lambda chosen: tuple(timer.compare([graph.model, graph.pruned(chosen[0])], shape))
        )
        aimed = {"latency_aim_share": asked, "latency_aim_rounds": len(timed), "latency_selected_share": selected}
    else:
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
    if cost is not None:
        table.update(latency_table(graph, cost, removed, pruned, shape), **aimed)
        if selected < asked * (1 - TOLERANCE):
            table["warnings"].append(f"target latency: {ratio} is out of reach; pruned to the fastest reachable")
    return pruned, table


def latency_model(
    graph: ChannelGraph, example_input: torch.Tensor, batch: int, cache, step: int
) -> cost_model.CostModel:
    """The cost model of the graph's network at ``batch``, on its device and dtype, in the example's memory format,
    calibrated on the network kept at uniform shares of every group."""
    x = example_input
    # a 1x1 image or one channel is both: then torch's default layout
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    layout = "channels_last" if channels_last else "contiguous"

    def narrowed(share: float) -> nn.Module:
        gone = {c for g in graph.groups for c in g.channels[max(1, round(share * len(g.channels))) :]}
        return graph.pruned(gone)

    setting = cost_model.setting_of(graph.model, batch, layout, quick=False)
    return cost_model.build(graph.model, tuple(x.shape[1:]), setting, narrowed, cost_model.Cache(cache), step=step)


def latency_table(graph, cost: cost_model.CostModel, removed: set[int], pruned: nn.Module, input_shape) -> dict:
    """The latency entries of ``prune``'s table: the share removed as predicted and as measured, and the dense and
    pruned networks' milliseconds, timed together under the cost model's setting."""
    dense_ms, pruned_ms = cost_model.DeviceTimer(cost.setting).compare([graph.model, pruned], input_shape)
    return {
        "latency_batch": cost.setting.batch,
        "latency_model_seconds": cost.seconds,
        "latency_removed_predicted": 1 - predicted(graph, cost, removed, False) / predicted(graph, cost, set(), False),
        "latency_dense_ms": dense_ms,
        "latency_pruned_ms": pruned_ms,
        "latency_removed_measured": 1 - pruned_ms / dense_ms,
    }
