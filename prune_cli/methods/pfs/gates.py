"""Pruning from Scratch (Wang et al., AAAI 2020): channel gates learned on randomly initialised weights.

One gate ``g_c`` per channel of every channel group of the model (ResNets: the first conv of each
BasicBlock; VGG: every conv, exactly ``model.channel_groups()``) multiplies the output of the group's
BatchNorm (a forward hook, before the ReLU). A group several layers hold (``prune.residual=true``: a residual
stream, a depthwise chain) has one gate per channel too, applied at the channel's positions in every BatchNorm
holding it: the gate scales the channel wherever it lives, as the mask zeroes it there.

The weights stay at their random initialisation (:func:`freeze_weights`); only the gates are trained, with

    loss = CE + lam * (sum_c |g_c| / C_total - r) ** 2

(Adam, lr 0.01, lam 0.5, r 0.2 in the paper), gates clamped to [0, 1] after every step. Then the
global top-k gates are kept, k found by bisection so that the MACs reduction of the pruned network,
measured against the *standard* (unexpanded) model, is within 0.1% relative of the target
(``selection.select_top_gates``), and the pruned architecture is retrained from scratch by the pipeline.

Gate training runs the model in ``train()`` mode, as the official code does: BatchNorm normalises with
batch statistics and its running statistics (buffers) DO update, the parameters never change. The
gates are held by :class:`Gates`, not registered in the model, so ``model.parameters()`` and
``model.state_dict()`` never contain them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.structure.groups import Slot

__all__ = ["Gates", "freeze_weights", "select_epoch", "train_gates"]


class Gates:
    """One gate per channel of every channel group, multiplying the channel's output of every BatchNorm of the group.

    Build it after moving the model to its device (or call :meth:`to`). ``params[i]`` is the 1-D gate
    vector of ``model.channel_groups()[i]``.
    """

    def __init__(self, model: nn.Module, init: float = 1.0):
        modules = dict(model.named_modules())
        self.groups = model.channel_groups()
        self.params: list[nn.Parameter] = []
        self._hooks = []
        for group in self.groups:
            points = group.role("norm") or group.role("producer")  # without BatchNorm: where the mask zeroes it
            like = modules[points[0].module].weight
            p = nn.Parameter(torch.full((group.width(modules),), float(init), device=like.device, dtype=like.dtype))
            self.params.append(p)
            for slot in points:
                self._hooks.append(modules[slot.module].register_forward_hook(_gate_hook(p, slot)))
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

    def to(self, device) -> Gates:
        """Move the gates in place (the same Parameter objects, so hooks and optimizers stay valid)."""
        for p in self.params:
            p.data = p.data.to(device)
        return self


def _gate_hook(gate: nn.Parameter, slot: Slot):
    """A forward hook multiplying the norm's output channels by the gate, along the output's dim holding them
    (``slot.out_dim``: 1, or 3 for a channels-last [B, H, W, C]): channel i of the group at ``slot.positions[i]``
    (every one of them), the other channels of the layer by 1."""
    index, dim = slot.index(), slot.out_dim
    if index is not None:
        channel = torch.arange(len(index)).repeat_interleave(index.shape[1])
        index = index.flatten()

    def hook(module, inputs, out):
        shape = [1] * out.dim()
        shape[dim] = -1
        scale = gate.to(out.dtype)
        if index is not None:  # differentiable: the gates at their positions, 1 elsewhere
            ones = torch.ones(out.shape[dim], dtype=out.dtype, device=out.device)
            scale = ones.index_put((index.to(out.device),), scale[channel.to(out.device)])
        return out * scale.view(shape)

    return hook


def freeze_weights(model: nn.Module) -> None:
    """``requires_grad = False`` on every model parameter: PFS keeps the weights at their random init."""
    for p in model.parameters():
        p.requires_grad_(False)


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


def train_gates(
    model: nn.Module,
    gates: Gates,
    train_batches_fn: Callable[[int], Iterable],
    val_eval_fn: Callable[[nn.Module], float],
    *,
    epochs: int,
    lr: float = 0.01,
    lam: float = 0.5,
    target_density: float = 0.2,
    device="cpu",
    density_key: str = "density",
    log: Callable[[dict], None] | None = None,
) -> dict:
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
        means = _gate_epoch(model, gates, optimizer, train_batches_fn(epoch), device, target_density, lam)
        acc = float(val_eval_fn(model))
        row = {
            "epoch": epoch,
            **means,
            "density": gates.density(),
            "nonzero": gates.nonzero_fraction(),
            "val_acc": acc,
        }
        history.append(row)
        snapshots.append(gates.values())
        if log is not None:
            log(row)
    if not history:
        return {"history": [], "epoch": None, "qualified": False, "note": "no epochs", "gates": gates.values()}
    chosen, qualified = select_epoch(history, target_density, density_key)
    gates.load_(snapshots[chosen])
    note = (
        f"epoch {chosen}: best val_acc among epochs with {density_key} <= {target_density}"
        if qualified
        else f"no epoch reached {density_key} <= {target_density}; kept the last epoch ({chosen})"
    )
    return {"history": history, "epoch": chosen, "qualified": qualified, "note": note, "gates": snapshots[chosen]}


def _gate_epoch(model, gates: Gates, optimizer, batches: Iterable, device, target_density: float, lam: float) -> dict:
    """One epoch of gate training in ``train()`` mode; the mean loss, CE and regulariser over its batches."""
    model.train()
    sums, n = {"loss": 0.0, "ce": 0.0, "reg": 0.0}, 0
    for x, y in batches:
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
    return {k: v / max(n, 1) for k, v in sums.items()}
