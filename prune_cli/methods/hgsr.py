"""Loss-based global greedy channel selection (HGSR, Mitsuno & Kurita 2020).

Formulas and options: docs/methods.md "Loss-based greedy selection".

A binary mask per prunable channel. Each round, every unmasked candidate channel is scored by
``|L0 - L(masks + candidate)|`` on a fixed sample (L0 = cross-entropy of the ORIGINAL network, the
model in eval mode), and the lowest-scoring channel is masked, until the removed share of channels,
params or MACs reaches the target. Masking multiplies the group's BN output channel by 0 (forward
hooks), which gives exactly the outputs of the physically pruned network. A layer computing channels last
([B, H, W, C]: ConvNeXt's LayerNorms and linear layers) is masked along the dim holding its channels
(``Slot.out_dim``); a LayerNorm reading a masked channel still counts its zero in its statistics, so there the
masked loss is close to the pruned network's, not equal (docs/methods.md, "LayerNorm and channels-last layers").

Two modes, the same selection rule:

- ``exact``: one channel per round, every candidate measured by a real masked forward.
- ``fast``: (1) several channels per round, a fraction of the remaining budget, so the last rounds
  remove one channel at a time; within a round channels are taken one after another, predicting the
  loss as the sum of the measured single-channel changes, so a round imitates that many exact rounds;
  (2) one trunk pass per round caches the input of every stage (ResNet block / VGG conv+BN+ReLU) and a
  candidate is re-run only from the stage holding its group; (3) masked variants of one group run as
  one batch (K variants x N images, the mask a per-variant tensor); (4) a first-order Taylor pre-screen
  (one input-gradient backward in the same trunk pass), united with the changes measured in earlier
  rounds, picks the candidates that are then measured exactly; (5) the next trunk pass checks each
  round: "one step" = ``verify`` x the median |single change| of the round's measured candidates; if
  the measured loss misses the additive prediction by more than a step AND ends further from L0 than
  before by more than a step (the channels interact: on trained networks the loss change of many
  channels removed together is far from the sum of their single changes), the round is halved and
  re-checked, and later rounds are capped to that size (doubling again while the checks pass); the first
  round is capped at ``prescreen / prescreen_factor`` channels, so it measures no more than later ones.

With ``round_to`` N > 1 both modes take blocks instead of channels (``_Greedy.block_round``): the selection
engine's blocks, each a group's channels scoring lowest this round, measured masked as a whole.

Both modes run their passes on a working copy rebuilt without the removed channels whenever they hold
``COMPACT`` of its MACs (masked == physically pruned), so a pass costs what the network pruned so far costs.

Cost accounting (``stats``): a "pass" is the N-image sample through (part of) the network, the
unit of the exact greedy: ``forward_passes`` counts trunk passes and candidate evaluations, and
``exact_passes_estimate`` the passes the exact greedy needs (the sum over its rounds of the number of
candidates; for ``fast`` computed, not run, for the same channels removed one per round).
``image_forward_equivalents`` weighs every pass by the share of the model's MACs it runs, times N
images (an input-gradient backward counted as one forward); ``pass_equivalents`` = that / N.
Other keys: rounds, backward_passes, images_forwarded, halvings, channels_removed, removed_fraction,
loss_original (L0), loss_masked (final), removed ((group, channel) in removal order), seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from prune_cli.core.errors import UserError
from prune_cli.core.options import Choice, Float, Int, Option
from prune_cli.importance.criteria import Criterion, register
from prune_cli.models import Prunable
from prune_cli.structure.channels import Structure, prune_channels
from prune_cli.structure.counting import layer_macs
from prune_cli.structure.selection import Budget, blocks, check_target

MODES = ("exact", "fast")
TOLERANCE = 1e-3  # params/macs: land within 0.1% (relative) of the target amount where granularity allows
COMPACT = 0.1  # rebuild the working copy without its masked channels once they hold this share of its MACs


# ------------------------------------------------------------------ running a model by segments


def _stage_of(prefixes: list[str], module: str) -> int:
    for s, p in enumerate(prefixes):
        if p and (module == p or module.startswith(p + ".")):
            return s
    return 0


def _stage_macs(model: nn.Module, stages, x1: torch.Tensor) -> tuple[list[float], dict[str, float]]:
    """MACs per image of conv + linear layers in every segment, and of every such layer by name."""

    def run(x):
        for _, fn in stages:
            x = fn(x)

    prefixes = [p for p, _ in stages]
    macs = [0.0] * len(stages)
    layers = layer_macs(model, tuple(x1.shape[1:]), run)
    for name, m in layers.items():
        macs[_stage_of(prefixes, name)] += m
    return macs, layers


class _Replay:
    """Mixed into the class of a group's conv in the working copy: a trunk pass records its output, and the
    variant passes of its own group (whose masks act after it, on the BN output) get that output back
    instead of recomputing it: a candidate costs the network after its conv, not from it."""

    record = False
    replay: torch.Tensor | None = None
    last: torch.Tensor | None = None

    def forward(self, x):
        if self.replay is not None:
            return self.replay
        out = super().forward(x)
        if self.record:
            self.last = out.detach()
        return out


_REPLAY_CLASSES: dict[type, type] = {}


def _replayable(module: nn.Module) -> nn.Module:
    """``module`` with :class:`_Replay` mixed into its class (same parameters, state_dict and outputs)."""
    cls = type(module)
    if not issubclass(cls, _Replay):
        if cls not in _REPLAY_CLASSES:
            _REPLAY_CLASSES[cls] = type(f"Replay{cls.__name__}", (_Replay, cls), {})
        module.__class__ = _REPLAY_CLASSES[cls]
    return module


def _spread(mask: torch.Tensor, index: torch.Tensor | None, channels: int) -> torch.Tensor:
    """A group's mask ([..., width]) as the mask of a BatchNorm output of ``channels`` holding the group's channel i
    at ``index[i]`` (other channels 1); None: the output is the group."""
    if index is None:
        return mask
    out = mask.new_ones(*mask.shape[:-1], channels)
    out[..., index.flatten()] = mask.repeat_interleave(index.shape[1], dim=-1)
    return out


# ------------------------------------------------------------------ the target budget


class _Budget(Budget):
    """The selection's Budget, plus the goal in absolute amounts and whether one more step (a channel or, with
    ``round_to``, a block) still fits."""

    def __init__(self, structure: Structure, widths: list[int], target: str, ratio: float, round_to: int = 1):
        super().__init__(structure, widths, target)
        self.ratio, self.round_to = ratio, round_to
        if target == "channels":
            self.goal, self.tol = float(round(ratio * self.total)), 0.0
        else:
            self.goal = ratio * self.total
            self.tol = TOLERANCE * self.goal

    def reach(self, widths) -> None:
        """Make the goal what these (the narrowest allowed) widths remove: a latency share out of reach."""
        self.goal = self.total - self.amount(widths)
        self.tol = TOLERANCE * self.goal

    def remaining(self, widths) -> float:
        return self.goal - (self.total - self.amount(widths))

    def done(self, widths) -> bool:
        return self.remaining(widths) <= self.tol

    def steps(self, widths: np.ndarray) -> np.ndarray:
        """Channels the next removal from each group takes: one, or with ``round_to`` N the block down to the next
        multiple of N (width % N, then N at a time)."""
        if self.round_to == 1:
            return np.ones_like(widths)
        rest = widths % self.round_to
        return np.where(rest > 0, rest, self.round_to)

    def costs(self, widths: np.ndarray) -> np.ndarray:
        """Amount removed by taking each group's next step (exact, for the current widths)."""
        base, out, steps = self.amount(widths), np.zeros(len(widths)), self.steps(widths)
        for g in range(len(widths)):
            if widths[g] >= steps[g]:
                w = widths.copy()
                w[g] -= steps[g]
                out[g] = base - self.amount(w)
        return out

    def closer(self, widths: np.ndarray, avail: np.ndarray) -> np.ndarray:
        """Per group: does its next step bring the amount removed closer to the goal (where no step lands within
        tolerance: granularity)?"""
        rem = self.remaining(widths)
        return (avail > 0) & (np.abs(rem - self.costs(widths)) < abs(rem))

    def acceptable(self, widths: np.ndarray, avail: np.ndarray) -> np.ndarray:
        """Per group: may its next step go without overshooting and while the target stays reachable?"""
        ok = np.zeros(len(widths), dtype=bool)
        costs, rem = self.costs(widths), self.remaining(widths)
        free = avail > 0
        if self.target == "channels":
            return free & (rem >= costs)
        after = rem - costs
        ok = free & (after >= -self.tol)
        big = costs[free].max() if free.any() else 0.0
        # steps left per group (a heuristic with round_to: the later blocks priced as the next one)
        left = avail if self.round_to == 1 else np.where(free, 1 + (avail - self.steps(widths)) // self.round_to, 0)
        for g in np.nonzero(ok & (after > self.tol))[0]:
            if after[g] <= 4 * big:  # near the end: can the rest still be met by some set of steps?
                a = left.copy()
                a[g] -= 1
                ok[g] = _subset_sum_hits(costs, a, after[g] - self.tol, after[g] + self.tol)
        return ok


def _subset_sum_hits(costs: np.ndarray, counts: np.ndarray, lo: float, hi: float, size: int = 1 << 21) -> bool:
    """Is some sum of up to counts[g] copies of costs[g] in [lo, hi]? (bounded knapsack, bitset DP).

    Exact in units of the costs' gcd; above ``size`` units it works in coarser units (a heuristic)."""
    merged: dict[int, int] = {}
    for c, n in zip(np.rint(costs).astype(np.int64).tolist(), counts.tolist()):
        if c > 0 and n > 0:
            merged[c] = merged.get(c, 0) + int(n)
    if lo <= 0 <= hi:
        return True
    if not merged or hi < 0:
        return False
    unit = math.gcd(*merged)
    coarse = hi / unit > size
    if coarse:
        unit = math.ceil(hi / size)
    lo_u = math.floor(lo / unit) - 1 if coarse else math.ceil(lo / unit)
    hi_u = math.ceil(hi / unit) + 1 if coarse else math.floor(hi / unit)
    if hi_u < max(lo_u, 0):
        return False
    reach = np.zeros(hi_u + 1, dtype=bool)
    reach[0] = True
    for c, n in merged.items():
        c, k = max(1, round(c / unit)), 1
        while n > 0:  # binary splitting: bundles of 1, 2, 4, ... copies
            v = c * min(k, n)
            if v <= hi_u:
                reach[v:] |= reach[: hi_u + 1 - v].copy()
            n, k = n - min(k, n), k * 2
    return bool(reach[max(lo_u, 0) :].any())


# ------------------------------------------------------------------ masked evaluation


@dataclass
class _Counter:
    forward_passes: int = 0  # passes of the N-image sample through (part of) the network
    backward_passes: int = 0
    ife: float = 0.0  # image-forward equivalents (MAC share x images)


class _Evaluator:
    """Masked passes on a working copy of the model (the caller's model is never touched).

    Masks multiply BN outputs (forward hooks); a trunk pass caches every stage's input; masked variants of
    one group run as one batch. Once the masked channels hold ``COMPACT`` of the working copy's MACs, the copy
    is rebuilt without them (masked == physically pruned), so a pass costs what the network pruned so far
    costs, not the dense network. Channels are named by their index in the caller's model throughout."""

    def __init__(
        self, model: Prunable, x: torch.Tensor, y: torch.Tensor, structure: Structure, cache: bool, batch_variants: int
    ):
        self.x, self.y, self.n = x, y, len(x)
        self.cache, self.batch_variants = cache, max(1, batch_variants)
        self.structure = structure
        self.groups = model.channel_groups()
        self.full_macs = float(structure.count(model.widths)[1]) or 1.0
        self.width0 = list(model.widths)
        self.index = [torch.arange(w) for w in self.width0]  # caller's channel ids the working copy holds
        self.hooks: list = []
        self._adopt(prune_channels(model, [torch.ones(w, dtype=torch.bool) for w in model.widths]).eval())
        self.committed = [torch.zeros(w, dtype=torch.bool) for w in self.width0]  # masked for good (caller's ids)
        self.graph = None  # (loss, saved BN outputs) of the last trunk pass, for the Taylor estimate
        self.count = _Counter()

    def _adopt(self, net: Prunable, keep: list[torch.Tensor] | None = None) -> None:
        """Make ``net`` (holding the channels ``self.index`` names) the working copy, its masks ``keep`` (None:
        nothing masked): hooks, stages, costs."""
        self.close()
        self.net = net
        modules = dict(net.named_modules())
        dev = self.x.device
        self.keep = keep or [torch.ones(len(i), device=dev) for i in self.index]  # 0 = masked in the working copy
        self.pos = []  # caller's channel id -> position in the working copy (-1: gone)
        for w, i in zip(self.width0, self.index):
            p = torch.full((w,), -1, dtype=torch.long)
            p[i] = torch.arange(len(i))
            self.pos.append(p)
        self.stages = net.segments() if self.cache else [("", net)]
        prefixes = [p for p, _ in self.stages]
        groups = net.channel_groups()
        # a candidate re-runs from the segment of its group's (first) producer: its masks act after it
        self.group_stage = [min(_stage_of(prefixes, s.module) for s in g.role("producer")) for g in groups]
        macs, layers = _stage_macs(net, self.stages, self.x[:1])
        self.frac_from = [sum(macs[s:]) / self.full_macs for s in range(len(macs))]
        # replay: the output of the one conv before the one BatchNorm where the group's mask acts
        self.convs = [None if g.shared else _replayable(modules[g.conv]) for g in groups]
        self.conv_frac = [0.0 if g.shared else layers.get(g.conv, 0.0) / self.full_macs for g in groups]
        self.variant: tuple[int, torch.Tensor] | None = None  # (group, [K, C] keep masks of the batched variants)
        # (group, BN output, index, the output's dim holding the channels)
        self.saved: list[tuple[int, torch.Tensor, torch.Tensor | None, int]] | None = None
        self.cached: list[torch.Tensor] = []
        # the mask acts on the group's BatchNorm outputs; a group several layers hold also on its producers' outputs,
        # as masking zeroes their rows (a depthwise conv with a bias after the BatchNorm would be nonzero otherwise)
        self.hooks = [
            modules[s.module].register_forward_hook(self._hook(i, s.index(), s.out_dim, s in g.mask_points()))
            for i, g in enumerate(groups)
            for s in (g.role("producer") + g.role("norm") if g.shared else g.role("norm"))
        ]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def mask(self, g: int, c: int, masked: bool = True) -> None:
        """Mask (or unmask) channel c of group g, c indexing the caller's model."""
        self.keep[g][self.pos[g][c]] = 0.0 if masked else 1.0

    def commit(self) -> None:
        """The channels masked now stay masked: a later rebuild of the working copy may drop them."""
        for committed, index, keep in zip(self.committed, self.index, self.keep):
            committed[index] |= (keep == 0).cpu()

    def _compact(self) -> None:
        """Rebuild the working copy without its committed channels once they hold ``COMPACT`` of its MACs
        (channels masked but not committed, a round on trial, stay in it, masked)."""
        kept = [~c[i] for c, i in zip(self.committed, self.index)]  # per position in the working copy
        held = self.structure.count([len(i) for i in self.index])[1]
        if self.structure.count([int(k.sum()) for k in kept])[1] > (1 - COMPACT) * held:
            return
        keep = [k[m.to(k.device)] for k, m in zip(self.keep, kept)]
        self.index = [i[m] for i, m in zip(self.index, kept)]
        self._adopt(prune_channels(self.net, kept).eval(), keep)

    def _hook(self, g: int, index: torch.Tensor | None, dim: int, norm: bool):
        """The forward hook of one layer of group g: its output times the group's mask along ``dim`` (the output's dim
        holding the channels: 1, or 3 for a channels-last [B, H, W, C]; ``index``: where the group's channels are in
        that dim; None: all of it, in order). A BatchNorm's output is kept for the Taylor estimate (``norm``)."""
        if index is not None:
            index = index.to(self.x.device)

        def hook(module, inputs, out):
            shape = [1] * out.dim()
            shape[dim] = -1
            if self.variant is not None and self.variant[0] == g:
                v = _spread(self.variant[1], index, out.shape[dim])
                k = v.shape[0]
                # [K x N, ...] as [K, N, ...]: variant k's mask on its N images, the channels at dim + 1
                out = (out.reshape(k, -1, *out.shape[1:]) * v.reshape(k, *shape)).reshape(out.shape)
            else:
                out = out * _spread(self.keep[g], index, out.shape[dim]).reshape(shape)
            if self.saved is not None and norm:
                self.saved.append((g, out, index, dim))
            return out

        return hook

    def _loss(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), self.y.repeat(k), reduction="none")
        return ce.reshape(k, self.n).double().mean(1)

    def trunk(self, keep_graph: bool) -> float:
        """Loss of the masked network on the sample; caches every stage's input. With ``keep_graph`` the
        autograd graph is kept for :meth:`taylor` (one input-gradient backward)."""
        self._compact()
        self.cached, x = [], self.x
        self.saved = [] if keep_graph else None
        with torch.enable_grad() if keep_graph else torch.no_grad():
            if keep_graph:
                x = x.detach().clone().requires_grad_(True)  # every activation gets a grad_fn
            replayed = [conv for conv in self.convs if conv is not None]
            for conv in replayed:
                conv.record = True
            try:
                for _, fn in self.stages:
                    self.cached.append(x.detach())
                    x = fn(x)
            finally:
                for conv in replayed:
                    conv.record = False
            loss = self._loss(x, 1)[0]
        self.graph = (loss, self.saved) if keep_graph else None
        self.saved = None
        self.count.forward_passes += 1
        self.count.ife += self.n * self.frac_from[0]
        return float(loss.detach())

    def taylor(self) -> list[torch.Tensor]:
        """First-order estimate of every channel's loss change if it were masked, from the last trunk pass:
        -sum(a * dL/da) over images and positions (a = the masked BN output; for a group several BatchNorms hold,
        summed over them: the channel goes from all of them at once)."""
        loss, saved = self.graph
        self.graph = None
        grads = torch.autograd.grad(loss, [a for _, a, _, _ in saved])
        est: list[torch.Tensor] = [torch.zeros(0)] * len(self.groups)
        for (g, a, index, dim), gr in zip(saved, grads):
            dims = [d for d in range(a.dim()) if d != dim]  # every dim but the channels
            change = (a.detach() * gr).sum(dims, dtype=torch.float64)
            change = -(change if index is None else change[index].sum(-1)).cpu()
            if not len(est[g]):
                est[g] = torch.zeros(self.width0[g], dtype=torch.float64)
            est[g][self.index[g]] += change
        self.count.backward_passes += 1
        self.count.ife += self.n * self.frac_from[0]
        return est

    def variants(self, g: int, channels: list[int] | list[tuple[int, ...]]) -> torch.Tensor:
        """Loss with each channel (or block of channels) of group g masked in addition to the current masks
        (float64, CPU)."""
        s = self.group_stage[g]
        out = []
        with torch.no_grad():
            for i in range(0, len(channels), self.batch_variants):
                chunk = channels[i : i + self.batch_variants]
                k = len(chunk)
                v = self.keep[g].repeat(k, 1)
                if isinstance(chunk[0], tuple):
                    for row, block in enumerate(chunk):
                        v[row, self.pos[g][list(block)]] = 0
                else:
                    v[torch.arange(k), self.pos[g][chunk]] = 0
                self.variant = (g, v)
                conv = self.convs[g]
                if conv is not None:
                    conv.replay = conv.last.repeat(k, *([1] * (conv.last.dim() - 1)))
                try:
                    x = self.cached[s]
                    x = x.repeat(k, *([1] * (x.dim() - 1)))
                    for _, fn in self.stages[s:]:
                        x = fn(x)
                finally:
                    self.variant = None
                    if conv is not None:
                        conv.replay = None
                out.append(self._loss(x, k).cpu())
        self.count.forward_passes += len(channels)
        self.count.ife += len(channels) * self.n * (self.frac_from[s] - self.conv_frac[g])
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


# ------------------------------------------------------------------ selection


def loss_greedy_select(
    model: Prunable,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    structure: Structure,
    target: str,
    ratio: float,
    min_channels: int = 1,
    protect: set[int] = frozenset(),
    mode: str = "fast",
    channels_per_round: int | float = 0.25,
    prescreen: int | None = 24,
    prescreen_factor: float = 2.0,
    verify: float | None = 1.0,
    batch_variants: int = 2,
    cache: bool = True,
    round_to: int = 1,
    progress: bool = False,
) -> tuple[list[torch.Tensor], dict]:
    """HGSR's loss-based global greedy selection. Returns (keep masks, one bool CPU tensor per group; stats).

    x, y: the fixed sample (normalised images on the model's device; labels). target: channels | params |
    macs; ratio: share of that quantity to remove (channels: of all channels of all groups; params/macs: of
    the whole model, ``structure.count``), met within 0.1% relative where whole channels allow.
    min_channels: no group keeps fewer; protect: indices of groups never pruned. round_to N: channels go in
    blocks that leave every pruned group a multiple of N (see ``_Greedy.block_round``); a group narrower than the
    least multiple of N holding ``min_channels`` keeps its width.

    Fast-mode knobs: ``channels_per_round`` (float: share of the channels still to remove taken per round;
    int: a fixed number), ``prescreen`` (at least this many candidates measured exactly per round, picked by
    the Taylor estimate and by earlier measurements; None = measure every candidate every round),
    ``prescreen_factor`` (and at least this many times the channels taken in the round), ``verify`` (a
    round is halved when its measured loss misses the additive prediction by more than ``verify`` x the
    median |delta L| of the measured candidates and moves away from L0 by more than that; None = no
    check). Both modes: ``batch_variants`` (masked variants per forward; on CPU 1-2 is fastest, larger
    batches only pay on a GPU), ``cache`` (resume from cached stage inputs: the same results, cheaper).
    """
    check_target(target, ratio)
    _check_arguments(mode, min_channels, channels_per_round, round_to)
    t0 = time.perf_counter()
    rounds = _Rounds(mode == "fast", channels_per_round, prescreen, prescreen_factor, verify)
    was_training = model.training
    model.eval()
    ev = _Evaluator(model, x, y, structure, cache, batch_variants)
    try:
        greedy = _Greedy(
            ev,
            _Budget(structure, np.array(ev.width0, dtype=np.int64), target, ratio, round_to),
            min_channels,
            set(protect),
            rounds,
        )
        keep, stats = greedy.run(progress)
    finally:
        ev.close()
        ev.graph = ev.cached = None
        model.train(was_training)
    stats["seconds"] = time.perf_counter() - t0
    return keep, stats


def _check_arguments(mode: str, min_channels: int, channels_per_round: int | float, round_to: int) -> None:
    """For callers of the Python API: a known mode, min_channels >= 1, a share in (0, 1] or a count >= 1,
    round_to an integer >= 1."""
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1 (a layer is never emptied), got {min_channels}")
    if (
        isinstance(channels_per_round, float)
        and not 0 < channels_per_round <= 1
        or not isinstance(channels_per_round, float)
        and channels_per_round < 1
    ):
        raise ValueError(f"channels_per_round: a share in (0, 1] or a count >= 1, got {channels_per_round}")


@dataclass(frozen=True)
class _Rounds:
    """How rounds are sized and checked: ``fast`` mode's knobs (exact mode: one channel, every candidate)."""

    fast: bool
    per_round: int | float
    prescreen: int | None
    prescreen_factor: float
    verify: float | None

    @property
    def taylor(self) -> bool:
        """Does every trunk pass keep its graph for the Taylor pre-screen?"""
        return self.fast and self.prescreen is not None

    def first_cap(self) -> float:
        """The first round is as small as the pre-screen measures anyway; rounds then double while checks pass."""
        return max(1, math.floor(self.prescreen / self.prescreen_factor)) if self.prescreen is not None else math.inf


class _Greedy:
    """The loss greedy's state between rounds (widths, masks, measurements, counts) and its named steps."""

    def __init__(self, ev: _Evaluator, budget: _Budget, min_channels: int, protect: set[int], rounds: _Rounds):
        self.ev, self.budget, self.rounds = ev, budget, rounds
        self.widths = np.array(ev.width0, dtype=np.int64)
        self.width0 = self.widths.copy()
        # channels each group may still lose
        self.avail = _available(self.widths, min_channels, protect, budget.round_to)
        if budget.remaining(self.widths - self.avail) > budget.tol:
            if budget.target != "latency":
                raise ValueError(
                    f"cannot remove {budget.ratio:.1%} of {budget.target} with min_channels={min_channels}"
                    + (f", round_to={budget.round_to}" if budget.round_to > 1 else "")
                    + f" and protected groups {sorted(protect)}"
                )
            budget.reach(self.widths - self.avail)  # out of reach: the fastest reachable (the prune stage says so)
        self.avail0 = self.avail.copy()
        self.keep = [torch.ones(int(w), dtype=torch.bool) for w in self.widths]
        self.stale: dict[tuple[int, int], float] = {}  # fast: loss change last measured for a candidate
        self.order: list[tuple[int, int]] = []  # (group, channel) of the removed channels, in removal order
        self.taken_steps: list[tuple[int, int]] = []  # (group, channels) of every step taken (a channel, or a block)
        self.k_cap = rounds.first_cap()
        self.n_rounds, self.halvings, self.exact_estimate, self.sizes = 0, 0, 0, []
        self.l0 = self.lcur = math.nan

    def run(self, progress: bool) -> tuple[list[torch.Tensor], dict]:
        """Rounds until the target is met or nothing more may go; (keep masks, stats)."""
        bar = self._progress_bar() if progress else None
        self.lcur = self.ev.trunk(keep_graph=self.rounds.taylor)
        self.l0 = self.lcur  # nothing masked yet: the original network's loss
        while not self.budget.done(self.widths) and self.round():
            if bar is not None:
                bar.n = self.budget.total - self.budget.amount(self.widths)
                bar.refresh()
        if bar is not None:
            bar.close()
        return self.keep, self.stats()

    def _progress_bar(self) -> tqdm:
        mode = "fast" if self.rounds.fast else "exact"
        target = self.budget.target
        return tqdm(total=self.budget.goal, unit=target, unit_scale=True, desc=f"loss greedy ({mode}, {target})")

    def round(self) -> bool:
        """Measure the candidates, take the round's channels, mask them for good; False when none can go."""
        if self.budget.round_to > 1:
            return self.block_round()
        ok = self.budget.acceptable(self.widths, self.avail)
        cands = [(g, c) for g in range(len(self.keep)) if ok[g] for c in torch.nonzero(self.keep[g]).flatten().tolist()]
        if not cands:
            return False
        self.exact_estimate += int(sum(int(k.sum()) for k, a in zip(self.keep, self.avail) if a > 0))
        k = self.round_size(cands)
        delta = self.measure(self.to_measure(cands, k))
        self.stale.update(delta)
        taken = _take(delta, self.lcur, self.l0, k, self.widths, self.avail, self.budget)
        if not taken:
            return False
        self.remove(*self.mask_checked(taken, delta))
        return True

    def block_round(self) -> bool:
        """A round with ``round_to``: the candidates are blocks, one per group the budget accepts (or, when none
        lands within tolerance, per group bringing the amount closer): the group's next step of channels scoring
        lowest this round (by their measured single changes; fast mode with a pre-screen: by the Taylor estimate).
        Each block is measured masked as a whole, and blocks are taken by the rule channels are."""
        ok = self.budget.acceptable(self.widths, self.avail)
        if not ok.any():
            ok = self.budget.closer(self.widths, self.avail)
        groups = np.nonzero(ok)[0].tolist()
        if not groups:
            return False
        chans = {g: torch.nonzero(self.keep[g]).flatten().tolist() for g in groups}
        if self.rounds.taylor:
            est = self.ev.taylor()
            single = {(g, c): float(est[g][c]) if len(est[g]) else 0.0 for g in groups for c in chans[g]}
        else:
            single = self.measure([(g, c) for g in groups for c in chans[g]])
        steps, delta = self.budget.steps(self.widths), {}
        for g in groups:
            ranked = sorted(chans[g], key=lambda c: abs(self.lcur + single[(g, c)] - self.l0))  # stable: ids break ties
            block = tuple(sorted(ranked[: steps[g]]))
            delta[(g, block)] = float(self.ev.variants(g, [block])[0]) - self.lcur
        self.exact_estimate += sum(len(chans[g]) + 1 for g in groups)
        taken = _take(delta, self.lcur, self.l0, self.round_size(list(delta)), self.widths, self.avail, self.budget)
        if not taken:
            return False
        self.remove(*self.mask_checked(taken, delta))
        return True

    def round_size(self, cands: list[tuple]) -> int:
        """Channels to take this round: 1 (exact), else a share of what remains or a fixed count, capped."""
        if not self.rounds.fast:
            return 1
        per_round = self.rounds.per_round
        if isinstance(per_round, float):
            per_channel = self.budget.costs(self.widths) / self.budget.steps(self.widths)
            mean_cost = float(np.mean([per_channel[g] for g, _ in cands]))
            todo = max(self.budget.remaining(self.widths), 0) / max(mean_cost, 1e-12)
            k = max(1, math.ceil(per_round * todo))
        else:
            k = int(per_round)
        return int(min(k, self.k_cap))

    def to_measure(self, cands: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
        """Every candidate, or (fast, pre-screen) those the Taylor estimate and earlier measurements pick."""
        if not self.rounds.taylor:
            return cands
        p = max(self.rounds.prescreen, math.ceil(self.rounds.prescreen_factor * k))
        if p >= len(cands):
            return cands
        # the Taylor estimate from the trunk pass's graph (backward run only now)
        return _prescreen(cands, self.ev.taylor(), self.stale, self.lcur, self.l0, p)

    def measure(self, cands: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
        """Loss change of masking each candidate alone, its group's variants batched together."""
        by_group: dict[int, list[int]] = {}
        for g, c in cands:
            by_group.setdefault(g, []).append(c)
        delta: dict[tuple[int, int], float] = {}
        for g, chans in by_group.items():
            losses = self.ev.variants(g, chans)
            for c, lv in zip(chans, losses.tolist()):
                delta[(g, c)] = lv - self.lcur
        return delta

    def mask_checked(self, taken, delta) -> tuple[list[tuple[int, int]], float, bool]:
        """Mask the round's channels; the trunk pass measures the result (and serves the next round). Fast mode
        halves a round whose channels interact more than their single changes predict: (taken, loss, halved)."""
        halved, scale = False, float(np.median(np.abs(list(delta.values()))))
        verify, lcur, l0 = self.rounds.verify, self.lcur, self.l0
        while True:
            for g, c in _channels(taken):
                self.ev.mask(g, c)
            lnew = self.ev.trunk(keep_graph=self.rounds.taylor)
            pred = lcur + sum(delta[t] for t in taken)
            # one step = verify x the median |single change| among this round's measured candidates
            step = verify * scale + 1e-6 * abs(l0) + 1e-9 if verify is not None else math.inf
            if not self.rounds.fast or len(taken) == 1 or abs(lnew - pred) <= step:
                return taken, lnew, halved  # as predicted
            if abs(lnew - l0) <= abs(lcur - l0) + step:
                return taken, lnew, halved  # no further from L0 than one step
            # the channels interact more than their single changes predict: keep the first half of the round
            for g, c in _channels(taken):
                self.ev.mask(g, c, masked=False)
            taken, halved = taken[: len(taken) // 2], True
            self.halvings += 1

    def remove(self, taken: list[tuple], lnew: float, halved: bool) -> None:
        """The round's channels go for good; later rounds are capped to a halved round's size, else double."""
        channels = _channels(taken)
        self.k_cap = len(channels) if halved else self.k_cap * 2
        self.ev.commit()
        self.lcur = lnew
        self.sizes.append(len(channels))
        self.taken_steps += [(g, _size(unit)) for g, unit in taken]
        for g, c in channels:
            self.keep[g][c] = False
            self.widths[g] -= 1
            self.avail[g] -= 1
            self.stale.pop((g, c), None)
            self.order.append((g, c))
        self.n_rounds += 1

    def stats(self) -> dict:
        """The run's cost accounting and result (the module docstring names every key)."""
        exact_estimate = self.exact_estimate
        if self.rounds.fast:  # the exact greedy removing the same channels one per round would measure every candidate
            exact_estimate = _exact_passes(self.width0, self.avail0, self.taken_steps, self.budget.round_to > 1)
        c, n = self.ev.count, self.ev.n
        return {
            "mode": "fast" if self.rounds.fast else "exact",
            "rounds": self.n_rounds,
            "forward_passes": c.forward_passes,
            "backward_passes": c.backward_passes,
            "images_forwarded": c.forward_passes * n,
            "image_forward_equivalents": c.ife,
            "pass_equivalents": c.ife / n,
            "exact_passes_estimate": exact_estimate,
            "channels_removed": int((self.width0 - self.widths).sum()),
            "removed_fraction": 1.0 - self.budget.amount(self.widths) / self.budget.total,
            "loss_original": self.l0,
            "loss_masked": self.lcur,
            "halvings": self.halvings,
            "round_sizes": self.sizes,
            "removed": self.order,
        }


def _available(widths: np.ndarray, min_channels: int, protect: set[int], round_to: int) -> np.ndarray:
    """Per group, the channels it may lose: none when protected, else all but ``min_channels`` (with ``round_to``
    N: down to the least multiple of N holding them; a narrower group none)."""
    last = [(b[-1][1] if (b := blocks(int(w), min_channels, round_to)) else 0) for w in widths]
    return np.array([0 if g in protect else n for g, n in enumerate(last)])


def _exact_passes(width0: np.ndarray, avail_init: np.ndarray, steps: list[tuple[int, int]], per_group: bool) -> int:
    """Passes summed over rounds of an exact greedy taking the same steps one per round: every candidate channel
    measured, and with ``per_group`` (blocks) one more pass per candidate group (its block measured whole)."""
    widths, avail, total = width0.copy(), avail_init.copy(), 0
    for g, n in steps:
        open_groups = [h for h in range(len(widths)) if avail[h] > 0]
        total += int(sum(widths[h] for h in open_groups)) + (len(open_groups) if per_group else 0)
        widths[g] -= n
        avail[g] -= n
    return total


def _channels(units: list[tuple]) -> list[tuple[int, int]]:
    """(group, channel) of every channel in steps that are channels ``(g, c)`` or blocks ``(g, (c, ...))``."""
    return [(g, c) for g, unit in units for c in (unit if isinstance(unit, tuple) else (unit,))]


def _size(unit: int | tuple[int, ...]) -> int:
    return len(unit) if isinstance(unit, tuple) else 1


def _prescreen(cands, est, stale, lcur, l0, p) -> list[tuple[int, int]]:
    """The p candidates most likely to score lowest: half by the Taylor estimate, half by earlier measurements."""
    taylor = np.array([abs(lcur + float(est[g][c]) - l0) if est is not None else 0.0 for g, c in cands])
    chosen = set(
        np.argsort(taylor, kind="stable")[: (p + 1) // 2].tolist()
        if stale
        else np.argsort(taylor, kind="stable")[:p].tolist()
    )
    if stale:
        known = [i for i, gc in enumerate(cands) if gc in stale]
        prev = sorted(known, key=lambda i: abs(lcur + stale[cands[i]] - l0))
        for i in prev:
            if len(chosen) >= p:
                break
            chosen.add(i)
        for i in np.argsort(taylor, kind="stable"):  # fill up when few earlier measurements exist
            if len(chosen) >= p:
                break
            chosen.add(int(i))
    return [cands[i] for i in sorted(chosen)]


def _take(delta, lcur, l0, k, widths, avail, budget) -> list[tuple]:
    """Up to k channels, one step after another (a channel, or with ``round_to`` a group's block: one per group):
    each the one whose masking keeps the predicted loss (current loss plus the measured changes of the steps taken
    so far) closest to L0, among the steps the budget still accepts."""
    keys = list(delta)
    g_of = np.array([g for g, _ in keys])
    d = np.array([delta[kk] for kk in keys])
    alive = np.ones(len(keys), dtype=bool)
    widths, avail = widths.copy(), avail.copy()
    pred, taken = lcur, []
    n = 0  # channels taken
    while n < k and not budget.done(widths) and alive.any():
        ok = budget.acceptable(widths, avail)
        allowed = alive & ok[g_of]
        if not allowed.any():
            # granularity: nothing lands within tolerance; take the best step that brings us closer
            allowed = alive & budget.closer(widths, avail)[g_of]
            if not allowed.any():
                break
        score = np.where(allowed, np.abs(pred + d - l0), np.inf)
        i = int(np.argmin(score))
        g, size = keys[i][0], _size(keys[i][1])
        taken.append(keys[i])
        alive[i] = False
        pred += d[i]
        widths[g] -= size
        avail[g] -= size
        n += size
    return taken


# ------------------------------------------------------------------ as a criterion


def _share_or_count(v) -> str | None:
    ok = 0 < v <= 1 if isinstance(v, float) else v >= 1
    return None if ok else f"a share in (0, 1] or a count >= 1 (got {v!r})"


@register("loss")
class LossGreedy(Criterion):
    """HGSR's loss-based global greedy selection: it selects to ``prune.ratio`` itself; scores.csv gets each
    channel's removal rank (0 = removed first; kept channels score past the last removal)."""

    needs_data = True
    channels_last = True  # its masks act along each mask point's ``Slot.out_dim``
    options = (
        Choice("mode", "fast", MODES, "exact: one channel per round, every candidate measured | fast: see docs"),
        Int("num_images", 128, "training images of the fixed sample (128 in HGSR)", lo=1),
        Option(
            "channels_per_round",
            "float",
            0.25,
            "fast: share of the channels still to remove taken per round (an integer: a fixed count)",
            rule=_share_or_count,
            rule_doc="a share in (0, 1] or a count >= 1",
        ),
        Int(
            "prescreen",
            24,
            "fast: at least this many candidates measured exactly per round; null = all",
            lo=1,
            nullable=True,
        ),
        Float(
            "prescreen_factor",
            2.0,
            "fast: ... and at least this many times the channels taken in the round",
            lo=0.0,
            lo_open=True,
        ),
        Float(
            "verify",
            1.0,
            "fast: halve a round whose loss misses the prediction by verify x the median "
            "single change; null = no check",
            lo=0.0,
            lo_open=True,
            nullable=True,
        ),
        Int("batch_variants", 2, "masked variants of the sample stacked into one forward (same result)", lo=1),
    )

    @classmethod
    def check_config(cls, cfg) -> None:
        p = cfg["prune"]
        if p["ratio"] is None or p["layer_ratios"]:
            raise UserError(
                "prune.ratio",
                "the loss criterion selects to a target: set prune.ratio in (0, 1) and no prune.layer_ratios",
            )

    @property
    def sample_size(self) -> int:
        return self.num_images

    def _scores(self, model, granularity, sample):
        raise UserError("criterion.name", "the loss criterion selects channels itself and gives no scores")

    def choose(self, model, structure, sample, prune, ratio, protect, progress=False):
        options = {k: v for k, v in self.hparams.items() if k != "num_images"}
        keep, stats = loss_greedy_select(
            model,
            sample.x,
            sample.y,
            structure=structure,
            target=prune["target"],
            ratio=ratio,
            min_channels=prune["min_channels"],
            protect=protect,
            round_to=prune.get("round_to", 1),
            progress=progress,
            **options,
        )
        record = {f"selection_{k}": v for k, v in stats.items() if isinstance(v, (int, float, str))}
        scores = [torch.full((len(k),), float(len(stats["removed"]))) for k in keep]
        for rank, (g, c) in enumerate(stats["removed"]):
            scores[g][c] = rank
        return keep, scores, record
