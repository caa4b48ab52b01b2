"""Pruning from Scratch (Wang et al., AAAI 2020): channel gates learned on randomly initialised weights.

One gate ``g_c`` per channel of every channel group of the model (ResNets: the first conv of each
BasicBlock; VGG: every conv, exactly ``model.channel_groups()``) multiplies the output of the group's
BatchNorm (a forward hook, before the ReLU). The weights stay at their random initialisation
(:func:`freeze_weights`); only the gates are trained, with

    loss = CE + lam * (sum_c |g_c| / C_total - r) ** 2

(Adam, lr 0.01, lam 0.5, r 0.2 in the paper), gates clamped to [0, 1] after every step. Then the
global top-k gates are kept, k found by bisection so that the MACs reduction of the pruned network,
measured against the *standard* (unexpanded) model, is within 0.1% relative of the target
(:func:`select_top_gates`), and the pruned architecture is retrained from scratch by the pipeline.

Gate training runs the model in ``train()`` mode, as the official code does: BatchNorm normalises with
batch statistics and its running statistics (buffers) DO update, the parameters never change. The
gates are held by :class:`Gates`, not registered in the model, so ``model.parameters()`` and
``model.state_dict()`` never contain them.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Gates", "freeze_weights", "select_top_gates", "select_epoch", "train_gates"]


class Gates:
    """One gate per channel of every channel group, multiplying the group's BN output.

    Build it after moving the model to its device (or call :meth:`to`). ``params[i]`` is the 1-D gate
    vector of ``model.channel_groups()[i]``.
    """

    def __init__(self, model: nn.Module, init: float = 1.0):
        modules = dict(model.named_modules())
        self.groups = model.channel_groups()
        self.params: list[nn.Parameter] = []
        self._hooks = []
        for group in self.groups:
            bn = modules[group.bn]
            p = nn.Parameter(torch.full((bn.num_features,), float(init), device=bn.weight.device,
                                        dtype=bn.weight.dtype))
            self.params.append(p)
            self._hooks.append(bn.register_forward_hook(_gate_hook(p)))
        self.total = sum(p.numel() for p in self.params)

    def remove(self) -> None:
        """Remove the hooks: the model computes as if it had never been gated."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def clamp_(self) -> None:
        with torch.no_grad():
            for p in self.params:
                p.clamp_(0.0, 1.0)

    def l1(self) -> torch.Tensor:
        """sum_c |g_c| over all gates (differentiable)."""
        return sum(p.abs().sum() for p in self.params)

    def density(self) -> float:
        """sum_c |g_c| / C_total: the quantity the regulariser drives to r."""
        with torch.no_grad():
            return float(self.l1()) / self.total

    def nonzero_fraction(self) -> float:
        """Fraction of gates != 0 (what the official code calls "sparsity" when it picks the epoch)."""
        with torch.no_grad():
            return sum(int((p != 0).sum()) for p in self.params) / self.total

    def loss(self, target_density: float, lam: float) -> torch.Tensor:
        """lam * (sum_c |g_c| / C_total - r) ** 2."""
        return lam * (self.l1() / self.total - target_density) ** 2

    def values(self) -> list[torch.Tensor]:
        """Detached copies of the gate vectors (a snapshot)."""
        return [p.detach().clone() for p in self.params]

    def load_(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)

    def to(self, device) -> "Gates":
        """Move the gates in place (the same Parameter objects, so hooks and optimizers stay valid)."""
        for p in self.params:
            p.data = p.data.to(device)
        return self


def _gate_hook(gate: nn.Parameter):
    def hook(module, inputs, out):
        shape = (1, -1) + (1,) * (out.dim() - 2)
        return out * gate.to(out.dtype).view(shape)
    return hook


def freeze_weights(model: nn.Module) -> None:
    """``requires_grad = False`` on every model parameter: PFS keeps the weights at their random init."""
    for p in model.parameters():
        p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# top-k selection by bisection on k


def select_top_gates(gate_values: list[torch.Tensor], structure, reference_macs: int, target_macs_reduction: float,
                     min_channels: int = 1, max_steps: int = 30, rel_tol: float = 1e-3
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
        local = np.lexsort((np.arange(size), -values[start:start + size]))  # value desc, index asc
        forced[start + local[:min(min_channels, size)]] = True
        start += size
    order = np.lexsort((np.arange(total), -values, ~forced))  # forced first, then value desc, index asc
    n_forced = int(forced.sum())

    target = float(target_macs_reduction)
    target_macs = reference_macs * (1.0 - target)
    tol = rel_tol * abs(target) * reference_macs
    lo_w, hi_w = target_macs - tol, target_macs + tol

    def widths_of(k: int) -> np.ndarray:
        return np.bincount(group_of[order[:k]], minlength=n_groups)

    def macs_of(widths) -> int:
        return structure.count(widths)[1]

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
    info = dict(k=n_kept, steps=steps, macs=int(macs), params=int(structure.count(widths)[0]),
                reduction=1.0 - macs / reference_macs, target=target, met=bool(met), how=how,
                out_of_order=out_of_order, widths=widths)
    return masks, info


# ---------------------------------------------------------------------------------------------
# gate training


def select_epoch(history: list[dict], target_density: float, key: str = "density") -> tuple[int, bool]:
    """Index of the best-``val_acc`` epoch among those with ``history[e][key] <= target_density``.

    Ties go to the earliest such epoch (the official code replaces only on a strictly better accuracy).
    If no epoch qualifies: the last epoch and ``False``.
    """
    best = None
    for e, h in enumerate(history):
        if h[key] <= target_density + 1e-12 and (best is None or h["val_acc"] > history[best]["val_acc"]):
            best = e
    if best is None:
        return len(history) - 1, False
    return best, True


def train_gates(model: nn.Module, gates: Gates, train_batches_fn: Callable[[int], Iterable],
                val_eval_fn: Callable[[nn.Module], float], *, epochs: int, lr: float = 0.01, lam: float = 0.5,
                target_density: float = 0.2, device="cpu", density_key: str = "density",
                log: Callable[[dict], None] | None = None) -> dict:
    """Train only the gates (Adam), weights frozen at init; restore the gates of the chosen epoch.

    Per step: ``loss = CE + gates.loss(target_density, lam)``, Adam step on the gate params, then
    ``gates.clamp_()``. The model runs in ``train()`` mode (BN batch statistics; BN running stats
    update, parameters do not: :func:`freeze_weights` is applied). After every epoch
    ``val_eval_fn(model)`` gives the validation accuracy (it may switch to eval mode; the next epoch
    switches back). The chosen epoch is the best-val one among those whose ``density_key``
    ("density" = sum|g|/C_total, the default; "nonzero" = fraction of gates != 0, what the official code
    compares with r) is <= ``target_density``; if none qualifies, the last epoch (``qualified=False``).

    Returns ``{"history": [{"epoch", "loss", "ce", "reg", "density", "nonzero", "val_acc"}, ...],
    "epoch": chosen index, "qualified": bool, "note": str, "gates": chosen gate values}``.
    """
    freeze_weights(model)
    model.to(device)
    gates.to(device)
    optimizer = torch.optim.Adam(gates.params, lr=lr)
    history, snapshots = [], []
    for epoch in range(epochs):
        model.train()
        sums, n = {"loss": 0.0, "ce": 0.0, "reg": 0.0}, 0
        for x, y in train_batches_fn(epoch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            ce = F.cross_entropy(model(x), y)
            reg = gates.loss(target_density, lam)
            loss = ce + reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            gates.clamp_()
            sums["loss"] += loss.item()
            sums["ce"] += ce.item()
            sums["reg"] += reg.item()
            n += 1
        acc = float(val_eval_fn(model))
        row = {"epoch": epoch, **{k: v / max(n, 1) for k, v in sums.items()}, "density": gates.density(),
               "nonzero": gates.nonzero_fraction(), "val_acc": acc}
        history.append(row)
        snapshots.append(gates.values())
        if log is not None:
            log(row)
    if not history:
        return {"history": [], "epoch": None, "qualified": False, "note": "no epochs", "gates": gates.values()}
    chosen, qualified = select_epoch(history, target_density, density_key)
    gates.load_(snapshots[chosen])
    note = (f"epoch {chosen}: best val_acc among epochs with {density_key} <= {target_density}" if qualified else
            f"no epoch reached {density_key} <= {target_density}; kept the last epoch ({chosen})")
    return {"history": history, "epoch": chosen, "qualified": qualified, "note": note, "gates": snapshots[chosen]}
