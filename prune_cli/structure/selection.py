"""The selection engine: per-channel scores -> keep masks that meet a target (docs/methods.md "Selection").

The target is a fraction of channels, params, MACs or predicted latency (``cost_model.py``) removed. ``layer``
scope removes the same share of every layer; ``global`` scope ranks all channels together. Either way the share is
found by search until the removed amount is within ``tolerance`` (relative) of the target; where whole channels
cannot land that close, the closest amount they reach, above or below. ``Budget`` measures amounts for every
selector (this one, the loss greedy, the PFS gates). With ``round_to`` N, channels go in blocks that leave every
pruned group a multiple of N wide. The ``prune.*`` options are declared here.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import numpy as np
import torch

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool, Choice, Float, Int, List, Map, Str, Value
from prune_cli.structure.attention import MODES
from prune_cli.structure.channels import Structure

TARGETS = ("channels", "params", "macs", "latency")


def check_target(target: str, ratio: float) -> None:
    """For callers of the Python API: a target this module counts and a ratio strictly between 0 and 1."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")


OPTIONS = (
    Choice(
        "target",
        "params",
        TARGETS,
        "what `ratio` is a share of: all prunable channels, the model's params / MACs, or its latency measured at "
        "prune.latency_batch (a cost model built on the run's device)",
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
    Int(
        "round_to",
        1,
        "a pruned layer keeps a multiple of this many channels (8 or 16: widths vector units and tensor cores fill)",
        lo=1,
        absent=1,
    ),
    Int(
        "latency_batch",
        1,
        "target=latency: the batch size the latency is measured and predicted at",
        lo=1,
        absent=1,
    ),
    Str(
        "latency_cache",
        None,
        "target=latency: the directory of the cost model's measurements; null: $PRUNE_CLI_CACHE/latency or "
        "~/.cache/prune_cli/latency",
        nullable=True,
        absent=None,
    ),
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
        if self.target == "latency":  # predicted milliseconds (the structure carries the bound cost model)
            if self.structure.latency is None:
                raise ValueError("target latency: the structure has no cost model bound (cost_model.Predictor)")
            return self.structure.latency.ms(widths)
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
    round_to: int = 1,
) -> list[tuple[int, tuple[int, ...], float]]:
    """(group, channels, rank key) of every block of channels that may go, lowest key first.

    A block is one channel, or with ``round_to`` N the channels whose removal takes the group to the next multiple
    of N below (its key: their mean). The ``min_channels`` best channels of each group (with ``round_to``: the
    multiple of N at or above it) and every channel of a protected group never appear; a group narrower than N
    keeps its width. ``dense_widths`` (iterative steps): the groups' widths before the first step, so ``layer``
    scope ranks by the share of the DENSE layer gone, not of what is left (else every step starts again at each
    layer's first channel and the layers listed first are drained).
    """
    if dense_widths is not None and len(dense_widths) != len(scores):
        dense_widths = None  # groups were removed whole: the current widths are the reference
    out = []
    for g, s in enumerate(scores):
        if g in protect:
            continue
        s = NORMALIZERS[normalize](s.detach().double().cpu())
        order = torch.argsort(s, stable=True)
        if scope == "layer":  # rank by position within the layer: i-th weakest of a layer = i / width
            dense = dense_widths[g] if dense_widths is not None else len(s)
            keys = [(dense - len(s) + i) / dense for i in range(len(s))]
        else:
            keys = s[order].tolist()
        for first, last in blocks(len(s), min_channels, round_to):
            out.append((g, tuple(order[first:last].tolist()), float(np.mean(keys[first:last]))))
    out.sort(key=lambda t: t[2])
    return out


def blocks(width: int, min_channels: int, round_to: int) -> list[tuple[int, int]]:
    """[first, last) positions, in a group's removal order, of the blocks of its channels that may go in turn: one
    channel each, or with ``round_to`` N the first to a multiple of N (width % N) then N at a time, down to the
    least multiple of N holding ``min_channels``."""
    if round_to == 1:
        return [(i, i + 1) for i in range(max(0, width - min_channels))]
    least = max(round_to, -(-min_channels // round_to) * round_to)
    if width < least:
        return []
    cuts = [0, width % round_to] if width % round_to else [0]
    while width - cuts[-1] - round_to >= least:
        cuts.append(cuts[-1] + round_to)
    return list(zip(cuts, cuts[1:]))


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
    round_to: int = 1,
) -> list[torch.Tensor]:
    """Keep masks (bool, one per group): remove the lowest-ranked channels until ``ratio`` of ``target`` is gone
    (the closest amount whole channels reach along the ranking; docs/methods.md "Selection").

    With ``threshold`` (and no ratio) every removable channel scoring below it goes instead (with ``round_to``: the
    whole blocks of them). ``fill=False`` (an iterative step before the last) keeps strict rank order: the longest
    prefix of the ranking that does not pass the ratio (the next step makes up the difference), so small steps do
    not drain the layers whose channels are cheapest, and the last step, with every means, is never handed an
    amount already passed. ``round_to``: channels go in blocks (``blocks``) that keep pruned groups multiples of it.
    """
    widths = [len(s) for s in scores]
    if threshold is not None and ratio is None:
        # a group's blocks score higher one after the other: those below the threshold are its first ones
        below = [
            (g, c)
            for g, chans, _ in removable_order(scores, min_channels, protect, "global", "none", round_to=round_to)
            if all(float(scores[g][c]) < threshold for c in chans)
            for c in chans
        ]
        return masks_from(widths, below)
    order = removable_order(scores, min_channels, protect, scope, normalize, dense_widths, round_to)
    budget = Budget(structure, widths, target)
    chosen, w, lo = _walk(order, widths, budget, ratio, tolerance, fill)
    if fill and abs(budget.removed(w) - ratio) > tolerance * ratio:  # short of the band: passing it may be closer
        taken = set(chosen)
        options = [(budget.removed(w), chosen)]
        over = _least_overshoot([(g, c) for g, c, _ in order if (g, c) not in taken], w, budget, ratio)
        if over is not None:  # the one block more that passes the ratio by the least
            options.append((over[1], [*chosen, over[0]]))
        if lo < len(order):  # the ranking's next prefix, without the fill
            prefix = order[: lo + 1]
            options.append((budget.removed(_widths_after(widths, prefix)), [(g, c) for g, c, _ in prefix]))
        chosen = min(options, key=lambda option: abs(option[0] - ratio))[1]  # ties: the first, below the ratio
    return masks_from(widths, [(g, c) for g, chans in chosen for c in chans])


def _widths_after(widths, entries) -> np.ndarray:
    """Group widths once the blocks ``entries`` ((group, channels, ...) each) are removed."""
    w = np.array(widths)
    np.subtract.at(w, [e[0] for e in entries], [len(e[1]) for e in entries])
    return w


def _walk(order, widths, budget: Budget, ratio: float, tolerance: float, fill: bool) -> tuple[list, np.ndarray, int]:
    """(blocks, widths after removing them, the prefix's length): the longest prefix of ``order`` that does not
    pass ``ratio``, then (with ``fill``) each following block that keeps the removed amount within
    ``ratio * (1 + tolerance)``, until within the tolerance band. A group's blocks go in order: once one of its
    blocks is passed over, the rest of that group waits."""
    lo, hi = 0, len(order)  # largest k whose removal does not pass the target (removed grows with k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if budget.removed(_widths_after(widths, order[:mid])) <= ratio:
            lo = mid
        else:
            hi = mid - 1
    chosen = [(g, c) for g, c, _ in order[:lo]]
    w = _widths_after(widths, order[:lo])
    if fill and abs(budget.removed(w) - ratio) > tolerance * ratio:  # whole channels overshoot: fill the gap
        held = set()
        for g, c, _ in order[lo:]:
            if g in held:
                continue
            w[g] -= len(c)
            if budget.removed(w) <= ratio * (1 + tolerance):
                chosen.append((g, c))
                if abs(budget.removed(w) - ratio) <= tolerance * ratio:
                    break
            else:  # the group's later blocks would pass too (the amount depends on widths alone) or skip one
                w[g] += len(c)
                held.add(g)
    return chosen, w, lo


def _least_overshoot(candidates, w: np.ndarray, budget: Budget, ratio: float):
    """((group, channels), removed amount) of the candidate block whose removal on top of widths ``w`` passes
    ``ratio`` by the least (the amount depends on the group and the block's size alone: a group's first candidate,
    the one that goes next, stands for it); None when there is no candidate."""
    best, seen = None, set()
    for g, c in candidates:
        if g in seen:
            continue
        seen.add(g)
        w[g] -= len(c)
        amount = budget.removed(w)
        w[g] += len(c)
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
    scores: list[torch.Tensor],
    names: list[str],
    layer_ratios: dict[str, float],
    min_channels: int = 1,
    round_to: int = 1,
) -> list[torch.Tensor]:
    """Remove the given share of channels from each layer matching a pattern (first match wins), none elsewhere.

    This states a paper's hand-set configuration exactly, e.g. Li et al.'s VGG-16-A: ``{conv1: 0.5, conv8: 0.5, ...}``.
    With ``round_to``, a pruned layer keeps the multiple of it at or above what the share leaves.
    """
    removed = []
    for g, (name, s) in enumerate(zip(names, scores)):
        ratio = next((r for p, r in layer_ratios.items() if fnmatchcase(name, p)), 0.0)
        # ceil(share x width), as Li et al. count: it reproduces their published params/FLOPs reductions
        n = min(math.ceil(ratio * len(s) - 1e-9), len(s) - min_channels)
        if n > 0 and round_to > 1:
            cuts = [last for _, last in blocks(len(s), min_channels, round_to) if last <= n]
            n = cuts[-1] if cuts else 0
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
        return select_per_layer(
            scores, names, dict(prune["layer_ratios"]), prune["min_channels"], prune.get("round_to", 1)
        )
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
        round_to=prune.get("round_to", 1),
    )
