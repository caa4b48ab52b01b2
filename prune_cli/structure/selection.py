"""The selection engine: per-channel scores -> keep masks that meet a target (docs/methods.md "Selection").

The target is a fraction of channels, params or MACs removed. ``layer`` scope removes the same share
of every layer; ``global`` scope ranks all channels together. Either way the share is found by search
until the removed amount is within ``tolerance`` (relative) of the target, as far as whole channels
allow. ``Budget`` measures amounts for every selector (this one, the loss greedy, the PFS gates).
The ``prune.*`` options are declared here.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import numpy as np
import torch

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool, Choice, Float, Int, List, Map, Value
from prune_cli.structure.channels import Structure

TARGETS = ("channels", "params", "macs")


def check_target(target: str, ratio: float) -> None:
    """For callers of the Python API: a target this module counts and a ratio strictly between 0 and 1."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")


OPTIONS = (
    Choice(
        "target", "params", TARGETS, "what `ratio` is a share of: all prunable channels, or the model's params/MACs"
    ),
    Float(
        "ratio",
        0.5,
        "share of the target quantity to remove; null: the criterion's own threshold",
        lo=0,
        hi=1,
        lo_open=True,
        hi_open=True,
        nullable=True,
    ),
    Choice("scope", "layer", ("layer", "global"), "layer: the same share of every layer; global: one ranking"),
    Choice(
        "granularity",
        None,
        ("filter", "feature"),
        nullable=True,
        doc="null: the criterion's own; filter: judge a channel by its producer filter; feature: by its consumers",
    ),
    Choice(
        "normalize", "none", ("none", "max", "l2", "mean"), "global scope: divide each layer's scores by this first"
    ),
    Int("min_channels", 1, "never leave a layer with fewer channels", lo=1),
    Bool(
        "residual",
        False,
        "also prune channels several layers share (residual streams, depthwise chains, concatenations), taken from "
        "the traced channel graph",
    ),
    Bool("protect_last", False, "keep the groups that feed the classifier whole (VGG's last conv, as HGSR does)"),
    Float("tolerance", 0.001, "relative error allowed on the target where whole channels allow", lo=0, lo_open=True),
    List("skip", [], "layer-name patterns never pruned, e.g. [layers.0.7] or [conv13]", item=Value("str")),
    Map(
        "layer_ratios",
        {},
        "{layer-name pattern: share of its channels to remove}; replaces target/ratio",
        item=Value("float", lo=0, hi=1, hi_open=True),
    ),
    Int("steps", 1, "iterative pruning: reach the ratio in this many steps", lo=1),
    Choice(
        "step_grid",
        "linear",
        ("linear", "geometric"),
        "the share kept after step k of n: linear 1 - ratio * k / n | geometric (1 - ratio)^(k / n) (PFP's cascade)",
    ),
    Int(
        "step_epochs",
        2,
        "finetuning epochs between steps (the schedule's finetune block settings); null: that block's epochs",
        lo=0,
        nullable=True,
    ),
    Float(
        "step_lr",
        0.01,
        "constant learning rate of the finetuning between steps; null: the block's own lr and lr schedule",
        lo=0,
        lo_open=True,
        nullable=True,
    ),
)


def check_config(cfg) -> None:
    """Rules across the ``prune.*`` options."""
    p = cfg["prune"]
    if p["steps"] > 1 and p["layer_ratios"]:
        raise UserError("prune.steps", "iterative steps need prune.ratio, not prune.layer_ratios")


NORMALIZERS = {
    "none": lambda s: s,
    "max": lambda s: s / s.abs().max().clamp_min(1e-12),
    "l2": lambda s: s / s.norm().clamp_min(1e-12),
    "mean": lambda s: s / s.abs().mean().clamp_min(1e-12),
}


class Budget:
    """Measures how much of the target quantity a set of per-group widths removes."""

    def __init__(self, structure: Structure, widths: list[int], target: str):
        self.structure, self.widths, self.target = structure, np.asarray(widths), target
        self.total = self.amount(self.widths)

    def amount(self, widths) -> float:
        if self.target == "channels":
            return float(np.sum(widths))
        params, macs = self.structure.count(widths)
        return float(params if self.target == "params" else macs)

    def removed(self, widths) -> float:
        """Fraction of the model's target quantity removed (channels: of all prunable channels)."""
        return 1.0 - self.amount(widths) / self.total


def removable_order(
    scores: list[torch.Tensor], min_channels: int, protect: set[int], scope: str, normalize: str
) -> list[tuple[int, int, float]]:
    """(group, channel, rank key) of every channel that may go, lowest key first.

    The ``min_channels`` best channels of each group and every channel of a protected group never appear.
    """
    out = []
    for g, s in enumerate(scores):
        if g in protect:
            continue
        s = NORMALIZERS[normalize](s.detach().double().cpu())
        order = torch.argsort(s, stable=True)
        removable = order[: max(0, len(s) - min_channels)]
        if scope == "layer":  # rank by position within the layer: i-th weakest of a layer = i / width
            out += [(g, int(c), i / len(s)) for i, c in enumerate(removable)]
        else:
            out += [(g, int(c), float(s[c])) for c in removable]
    out.sort(key=lambda t: t[2])
    return out


def select(
    scores: list[torch.Tensor],
    structure: Structure,
    *,
    target: str,
    ratio: float | None,
    scope: str = "global",
    normalize: str = "none",
    min_channels: int = 1,
    protect: set[int] = frozenset(),
    tolerance: float = 1e-3,
    threshold: float | None = None,
) -> list[torch.Tensor]:
    """Keep masks (bool, one per group): remove the lowest-ranked channels until ``ratio`` of ``target`` is gone.

    With ``threshold`` (and no ratio) every removable channel scoring below it goes instead.
    """
    widths = [len(s) for s in scores]
    order = removable_order(scores, min_channels, protect, scope, normalize)
    budget = Budget(structure, widths, target)

    def widths_after(k: int) -> np.ndarray:
        w = np.array(widths)
        np.subtract.at(w, [g for g, _, _ in order[:k]], 1)
        return w

    if threshold is not None and ratio is None:
        raw = [
            (g, c)
            for g, c, _ in removable_order(scores, min_channels, protect, "global", "none")
            if float(scores[g][c]) < threshold
        ]
        return masks_from(widths, raw)

    # largest k whose removal does not exceed the target (removed fraction grows with k)
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if budget.removed(widths_after(mid)) <= ratio:
            lo = mid
        else:
            hi = mid - 1
    chosen = [(g, c) for g, c, _ in order[:lo]]
    w = widths_after(lo)
    # whole channels overshoot: fill the remaining gap with the next-ranked channels that still fit
    if abs(budget.removed(w) - ratio) > tolerance * ratio:
        for g, c, _ in order[lo:]:
            w[g] -= 1
            if budget.removed(w) <= ratio * (1 + tolerance) and w[g] >= min_channels:
                chosen.append((g, c))
                if abs(budget.removed(w) - ratio) <= tolerance * ratio:
                    break
            else:
                w[g] += 1
    return masks_from(widths, chosen)


def masks_from(widths: list[int], removed: list[tuple[int, int]]) -> list[torch.Tensor]:
    keep = [torch.ones(w, dtype=torch.bool) for w in widths]
    for g, c in removed:
        keep[g][c] = False
    return keep


def matching(names: list[str], patterns) -> set[int]:
    """Indices of the group names that match any of the glob ``patterns`` (e.g. ``layers.2.*``, ``conv1?``)."""
    return {i for i, n in enumerate(names) if any(fnmatchcase(n, p) for p in patterns)}


def select_per_layer(
    scores: list[torch.Tensor], names: list[str], layer_ratios: dict[str, float], min_channels: int = 1
) -> list[torch.Tensor]:
    """Remove the given share of channels from each layer matching a pattern (first match wins), none elsewhere.

    This states a paper's hand-set configuration exactly, e.g. Li et al.'s VGG-16-A: ``{conv1: 0.5, conv8: 0.5, ...}``.
    """
    removed = []
    for g, (name, s) in enumerate(zip(names, scores)):
        ratio = next((r for p, r in layer_ratios.items() if fnmatchcase(name, p)), 0.0)
        # ceil(share x width), as Li et al. count: it reproduces their published params/FLOPs reductions
        n = min(math.ceil(ratio * len(s) - 1e-9), len(s) - min_channels)
        removed += [(g, int(c)) for c in torch.argsort(s.detach().double().cpu(), stable=True)[: max(n, 0)]]
    return masks_from([len(s) for s in scores], removed)


def choose_channels(
    scores: list[torch.Tensor],
    structure: Structure,
    names: list[str],
    prune,
    ratio: float | None,
    protect: set[int],
    threshold: float | None = None,
) -> list[torch.Tensor]:
    """Keep masks from scores under the ``prune.*`` settings: hand-set per-layer shares, a criterion's own
    ``threshold`` (with no ratio), or the target ``ratio`` met by search."""
    if prune["layer_ratios"]:
        return select_per_layer(scores, names, dict(prune["layer_ratios"]), prune["min_channels"])
    if ratio is None and threshold is None:
        raise UserError(
            "prune.ratio", "this criterion has no threshold of its own; set a ratio in (0, 1) or prune.layer_ratios"
        )
    return select(
        scores,
        structure,
        target=prune["target"],
        ratio=ratio,
        scope=prune["scope"],
        normalize=prune["normalize"],
        min_channels=prune["min_channels"],
        protect=protect,
        tolerance=prune["tolerance"],
        threshold=threshold,
    )


# ---------------------------------------------------------------- top-k gates to a MACs target (PFS)


def select_top_gates(
    gate_values: list[torch.Tensor],
    structure,
    reference_macs: int,
    target_macs_reduction: float,
    min_channels: int = 1,
    max_steps: int = 30,
    rel_tol: float = 1e-3,
) -> tuple[list[torch.Tensor], dict]:
    """Keep the global top-k gates, k by bisection, so that the MACs reduction meets the target.

    ``structure``: ``pruning.structure(gated_model, input_shape)`` of the (possibly expanded) gated model.
    ``reference_macs``: MACs of the STANDARD model the reduction is measured against.
    The reduction ``1 - macs(pruned) / reference_macs`` must satisfy
    ``|reduction - target| <= rel_tol * target`` (0.1% relative, as PFS's official code).

    Channel priority: the ``min_channels`` top gates of every group first (so no group drops below
    it), then every other gate by value, descending; ties (gates clamped at exactly 0 or 1 are common)
    go to the lower (group, channel) index. Keeping the first k of this order makes MACs nondecreasing
    in k, so a binary search over k finds the smallest k whose MACs reach the window.

    Because channels are discrete, no k may land in the window: a ResNet-20 channel costs 0.14-0.73%
    of its MACs, more than the +-0.05% window at a 50% target. Then, in order:
    (1) *fill*: from the largest top-k below the window, add the remaining channels in priority order,
        skipping any that would overshoot, until the window is reached;
    (2) *swap*: from the fill result, the smallest top-k above and the largest below the window, try
        every single move "add the best unkept channel of group a and/or drop the worst kept (not
        forced) channel of group d"; among all in-window results keep the one with the largest total
        gate value.
    ``info["how"]`` says which ("topk", "fill", "swap", or "closest" when the window is unreachable,
    e.g. the target lies beyond what ``min_channels``/full width allow or between two reachable MACs
    values: then the closest candidate is returned with ``info["met"] = False``).
    ``info["out_of_order"]`` counts kept channels outside the strict top-``k`` (0 for "topk"; in tests
    on ResNet-20/56, VGG-11/16, plain and x1.25 expanded, it stays <= 3, and every reachable target
    was met).

    Returns (keep masks, one bool tensor per group on the gates' device) and info:
    ``k`` (channels kept), ``steps`` (bisection evaluations), ``macs``, ``params``, ``reduction``,
    ``target``, ``met``, ``how``, ``out_of_order``, ``widths``.
    """
    sizes = [int(v.numel()) for v in gate_values]
    n_groups, total = len(sizes), sum(sizes)
    values = torch.cat([v.detach().flatten().float().cpu() for v in gate_values]).numpy()
    group_of = np.repeat(np.arange(n_groups), sizes)
    forced = np.zeros(total, dtype=bool)
    start = 0
    for size in sizes:
        local = np.lexsort((np.arange(size), -values[start : start + size]))  # value desc, index asc
        forced[start + local[: min(min_channels, size)]] = True
        start += size
    order = np.lexsort((np.arange(total), -values, ~forced))  # forced first, then value desc, index asc
    n_forced = int(forced.sum())

    target = float(target_macs_reduction)
    target_macs = reference_macs * (1.0 - target)
    tol = rel_tol * abs(target) * reference_macs
    lo_w, hi_w = target_macs - tol, target_macs + tol

    def widths_of(k: int) -> np.ndarray:
        return np.bincount(group_of[order[:k]], minlength=n_groups)

    budget = Budget(structure, sizes, "macs")

    def macs_of(widths) -> int:
        return int(budget.amount(widths))

    steps = 0
    cache: dict[int, int] = {}

    def macs_k(k: int) -> int:
        nonlocal steps
        if k not in cache:
            steps += 1
            cache[k] = macs_of(widths_of(k))
        return cache[k]

    # smallest k in [n_forced, total] with macs(k) >= lo_w (binary search; macs nondecreasing in k)
    lo, hi = n_forced, total
    if macs_k(hi) < lo_w:
        k = hi
    elif macs_k(lo) >= lo_w:
        k = lo
    else:  # invariant: macs(lo) < lo_w <= macs(hi)
        while hi - lo > 1 and steps < max_steps:
            mid = (lo + hi) // 2
            if macs_k(mid) >= lo_w:
                hi = mid
            else:
                lo = mid
        k = hi

    rank = np.empty(total, dtype=np.int64)
    rank[order] = np.arange(total)

    def prefix(k: int):
        keep = np.zeros(total, dtype=bool)
        keep[order[:k]] = True
        return keep, widths_of(k), macs_k(k)

    inside = lambda m: lo_w <= m <= hi_w  # noqa: E731
    keep, widths, macs = prefix(k)
    how = "topk"
    below = max((j for j, m in cache.items() if m < lo_w), default=None)  # largest k known below the window
    if macs > hi_w and below is not None:
        # no top-k lands in the window. (1) fill: from the top-`below` set, add the remaining channels in
        # priority order, skipping any that would overshoot the window, until the window is reached
        f_keep, f_widths, f_macs = prefix(below)
        for c in order[below:]:
            f_widths[group_of[c]] += 1
            m = macs_of(f_widths)
            if m <= hi_w:
                f_keep[c], f_macs = True, m
                if m >= lo_w:
                    break
            else:
                f_widths[group_of[c]] -= 1
        states = [(f_keep, f_widths, f_macs), (keep, widths, macs), prefix(below)]
        found = [(float(values[s[0]].sum()), "fill", s) for s in states[:1] if inside(s[2])]
        if not found:
            # (2) one move from any of these states: add the best unkept channel of a group, drop the
            # worst kept (not forced) channel of a group, or both; keep the in-window result of largest
            # total gate value
            for s_keep, s_widths, _ in states:
                best_out, worst_in = {}, {}
                for c in order:
                    g = group_of[c]
                    if s_keep[c]:
                        if not forced[c]:
                            worst_in[g] = c
                    elif g not in best_out:
                        best_out[g] = c
                adds = [None] + list(best_out.values())
                drops = [None] + list(worst_in.values())
                for a in adds:
                    for d in drops:
                        if a is None and d is None:
                            continue
                        w = s_widths.copy()
                        if a is not None:
                            w[group_of[a]] += 1
                        if d is not None:
                            w[group_of[d]] -= 1
                        m = macs_of(w)
                        if inside(m):
                            kk = s_keep.copy()
                            if a is not None:
                                kk[a] = True
                            if d is not None:
                                kk[d] = False
                            found.append((float(values[kk].sum()), "swap", (kk, w, m)))
        if found:
            _, how, (keep, widths, macs) = max(found, key=lambda f: f[0])
        else:
            keep, widths, macs = min(states, key=lambda s: abs(s[2] - target_macs))
            how = "closest"
    met = inside(macs)
    n_kept = int(keep.sum())
    out_of_order = int((rank[keep] >= n_kept).sum())  # kept channels outside the strict top-n_kept

    device = gate_values[0].device if gate_values else torch.device("cpu")
    keep_t = torch.from_numpy(keep)
    masks = [m.to(device) for m in torch.split(keep_t, sizes)]
    widths = [int(w) for w in widths]
    info = dict(
        k=n_kept,
        steps=steps,
        macs=int(macs),
        params=int(structure.count(widths)[0]),
        reduction=1.0 - macs / reference_macs,
        target=target,
        met=bool(met),
        how=how,
        out_of_order=out_of_order,
        widths=widths,
    )
    return masks, info
