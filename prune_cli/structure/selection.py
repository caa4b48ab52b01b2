"""The selection engine: per-channel scores -> keep masks that meet a target (docs/methods.md "Selection").

The target is a fraction of channels, params or MACs removed. ``layer`` scope removes the same share
of every layer; ``global`` scope ranks all channels together. Either way the share is found by search
until the removed amount is within ``tolerance`` (relative) of the target; where whole channels cannot
land that close, the closest amount they reach, above or below. ``Budget`` measures amounts for every
selector (this one, the loss greedy, the PFS gates). The ``prune.*`` options are declared here.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import numpy as np
import torch

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool, Choice, Float, Int, List, Map, Value
from prune_cli.structure.attention import MODES
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
    Choice(
        "residual",
        "auto",
        ("auto", True, False),
        "true: also prune channels several layers share (residual streams, depthwise chains, concatenations), taken "
        "from the traced channel graph; auto: so for traced networks (torchvision, custom), block-internal channels "
        "for the built-in ones; false: channels one conv produces",
        absent=False,
    ),
    Choice(
        "attention",
        "heads",
        MODES,
        "attention layers (with prune.residual auto / true): heads removes whole heads, head_width the same "
        "positions of every head, none keeps them whole",
        absent="heads",
    ),
    Bool("protect_last", False, "keep the groups that feed the classifier whole (VGG's last conv, as HGSR does)"),
    Float(
        "tolerance",
        0.001,
        "relative error allowed on the target where whole channels allow; else the closest reachable amount",
        lo=0,
        lo_open=True,
    ),
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
        absent="linear",
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
    scores: list[torch.Tensor],
    min_channels: int,
    protect: set[int],
    scope: str,
    normalize: str,
    dense_widths: list[int] | None = None,
) -> list[tuple[int, int, float]]:
    """(group, channel, rank key) of every channel that may go, lowest key first.

    The ``min_channels`` best channels of each group and every channel of a protected group never appear.
    ``dense_widths`` (iterative steps): the groups' widths before the first step, so ``layer`` scope ranks by the
    share of the DENSE layer gone, not of what is left (else every step starts again at each layer's first channel
    and the layers listed first are drained).
    """
    if dense_widths is not None and len(dense_widths) != len(scores):
        dense_widths = None  # groups were removed whole: the current widths are the reference
    out = []
    for g, s in enumerate(scores):
        if g in protect:
            continue
        s = NORMALIZERS[normalize](s.detach().double().cpu())
        order = torch.argsort(s, stable=True)
        removable = order[: max(0, len(s) - min_channels)]
        if scope == "layer":  # rank by position within the layer: i-th weakest of a layer = i / width
            dense = dense_widths[g] if dense_widths is not None else len(s)
            gone = dense - len(s)
            out += [(g, int(c), (gone + i) / dense) for i, c in enumerate(removable)]
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
    dense_widths: list[int] | None = None,
    fill: bool = True,
) -> list[torch.Tensor]:
    """Keep masks (bool, one per group): remove the lowest-ranked channels until ``ratio`` of ``target`` is gone
    (the closest amount whole channels reach along the ranking; docs/methods.md "Selection").

    With ``threshold`` (and no ratio) every removable channel scoring below it goes instead. ``fill=False`` (an
    iterative step before the last) keeps strict rank order: the longest prefix of the ranking that does not pass
    the ratio (the next step makes up the difference), so small steps do not drain the layers whose channels are
    cheapest, and the last step, with every means, is never handed an amount already passed.
    """
    widths = [len(s) for s in scores]
    if threshold is not None and ratio is None:
        raw = [
            (g, c)
            for g, c, _ in removable_order(scores, min_channels, protect, "global", "none")
            if float(scores[g][c]) < threshold
        ]
        return masks_from(widths, raw)
    order = removable_order(scores, min_channels, protect, scope, normalize, dense_widths)
    budget = Budget(structure, widths, target)
    chosen, w, lo = _walk(order, widths, budget, ratio, tolerance, fill)
    if fill and abs(budget.removed(w) - ratio) > tolerance * ratio:  # short of the band: passing it may be closer
        taken = set(chosen)
        options = [(budget.removed(w), chosen)]
        over = _least_overshoot([(g, c) for g, c, _ in order if (g, c) not in taken], w, budget, ratio)
        if over is not None:  # the one channel more that passes the ratio by the least
            options.append((over[1], [*chosen, over[0]]))
        if lo < len(order):  # the ranking's next prefix, without the fill
            prefix = order[: lo + 1]
            w = np.array(widths)
            np.subtract.at(w, [g for g, _, _ in prefix], 1)
            options.append((budget.removed(w), [(g, c) for g, c, _ in prefix]))
        chosen = min(options, key=lambda option: abs(option[0] - ratio))[1]  # ties: the first, below the ratio
    return masks_from(widths, chosen)


def _walk(order, widths, budget: Budget, ratio: float, tolerance: float, fill: bool) -> tuple[list, np.ndarray, int]:
    """(channels, widths after removing them, the prefix's length): the longest prefix of ``order`` that does not
    pass ``ratio``, then
    (with ``fill``) each following channel that keeps the removed amount within ``ratio * (1 + tolerance)``, until
    within the tolerance band."""

    def widths_after(k: int) -> np.ndarray:
        w = np.array(widths)
        np.subtract.at(w, [g for g, _, _ in order[:k]], 1)
        return w

    lo, hi = 0, len(order)  # largest k whose removal does not pass the target (removed grows with k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if budget.removed(widths_after(mid)) <= ratio:
            lo = mid
        else:
            hi = mid - 1
    chosen = [(g, c) for g, c, _ in order[:lo]]
    w = widths_after(lo)
    if fill and abs(budget.removed(w) - ratio) > tolerance * ratio:  # whole channels overshoot: fill the gap
        for g, c, _ in order[lo:]:
            w[g] -= 1
            if budget.removed(w) <= ratio * (1 + tolerance):
                chosen.append((g, c))
                if abs(budget.removed(w) - ratio) <= tolerance * ratio:
                    break
            else:
                w[g] += 1
    return chosen, w, lo


def _least_overshoot(candidates, w: np.ndarray, budget: Budget, ratio: float):
    """((group, channel), removed amount) of the candidate whose removal on top of widths ``w`` passes ``ratio``
    by the least (the amount depends on the group alone: its lowest-ranked candidate stands for it); None when
    there is no candidate."""
    best, seen = None, set()
    for g, c in candidates:
        if g in seen:
            continue
        seen.add(g)
        w[g] -= 1
        amount = budget.removed(w)
        w[g] += 1
        if best is None or amount < best[1]:
            best = ((g, c), amount)
    return best


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
        dense_widths=prune.get("dense_widths"),
        fill=prune.get("fill", True),
        target=prune["target"],
        ratio=ratio,
        scope=prune["scope"],
        normalize=prune["normalize"],
        min_channels=prune["min_channels"],
        protect=protect,
        tolerance=prune["tolerance"],
        threshold=threshold,
    )
