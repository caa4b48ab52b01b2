"""Sparsity regularizers added to the training loss, and weight/group sparsity statistics.

The training loop does, per step::

    loss = F.cross_entropy(model(x), y) + reg.penalty()   # lambda included; a 0-dim tensor
    loss.backward(); reg.before_step()                    # if reg.edits_gradients: e.g. SWP's L1 subgradient
    optimizer.step(); reg.after_step()                    # e.g. clamp gammas (polarization)

and logs the penalty's mean per epoch (``metrics.csv`` column ``reg``; 0 for regularizers that only edit
gradients).

Formulas are the ones of docs/methods.md, section "Regularizers". A conv weight is
``W[o, i, kh, kw]``; a kernel ``W[o, i]``; a filter group ``W[o]``; a feature group
``W[:, i]``. Linear weights ``W[o, i]`` are treated as convs with 1x1 kernels.

The regularized tensors are chosen once in ``__init__`` (``layers`` option). Layers whose
weights have the same shape are stacked in ``penalty()`` so that the cost is a handful
of vectorised ops per distinct shape (ResNet-56: 6 shapes for 55 convs), never a Python
loop over groups, channels or kernels.

Norms that are not differentiable at 0 (``||w||_2``, ``sqrt``) get gradient 0 there
(a valid subgradient for the norm; for ``sqrt`` the practical choice), so exactly-zero
kernels or groups never give NaN gradients. No eps is added to any value.
"""

from __future__ import annotations

import abc
from dataclasses import replace

import torch
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.core.options import Choice, Float, check_block
from prune_cli.core.registry import Registry

ZERO_THRESHOLD = 1e-3  # docs/methods.md "Counting conventions": a weight counts as zero when |w| < 1e-3


# --------------------------------------------------------------------------- helpers


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x >= 0, with gradient 0 (instead of inf -> NaN) where x == 0."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, 1.0)), 0.0)


def _l2(x: torch.Tensor, dim) -> torch.Tensor:
    """L2 norm over ``dim``; PyTorch's norm backward gives gradient 0 at a zero vector."""
    return torch.linalg.vector_norm(x, 2, dim=dim)


def _as_4d(w: torch.Tensor) -> torch.Tensor:
    return w if w.dim() == 4 else w.reshape(w.shape[0], w.shape[1], 1, 1)


def _stack(params: list[torch.Tensor]) -> torch.Tensor:
    """(L, O, I, kh, kw) from L weights of one shape (a view when L == 1)."""
    if len(params) == 1:
        return _as_4d(params[0]).unsqueeze(0)
    return torch.stack([_as_4d(p) for p in params])


@torch.no_grad()
def l1_subgradient_(tensors: list[torch.Tensor], alpha: float, threshold: float) -> None:
    """The per-step rule of learned factors (SWP's skeleton, RMNet's channel factors), in place:
    ``grad += alpha * sign(t)``, then ``t`` and its gradient zeroed where ``|t| <= threshold``."""
    with_grad = [t for t in tensors if t.grad is not None]
    if with_grad and alpha:
        torch._foreach_add_([t.grad for t in with_grad], torch._foreach_sign(with_grad), alpha=alpha)
    for t in tensors:
        alive = t.abs() > threshold
        t.mul_(alive)
        if t.grad is not None:
            t.grad.mul_(alive)


# --------------------------------------------------------------------------- layer selection

WEIGHT_LAYERS = ("all_convs_except_shortcut", "prunable", "all_convs", "all")
BN_LAYERS = ("all", "prunable")


def _groups(model: nn.Module):
    if not hasattr(model, "channel_groups"):
        raise UserError("regularizer.layers", "'prunable' needs a model with channel groups")
    return model.channel_groups()


def _shortcut_convs(model: nn.Module) -> set[str]:
    """The model's residual projection convs: a prune_cli model knows them; any other module by name."""
    if hasattr(model, "shortcut_convs"):
        return set(model.shortcut_convs())
    return {n for n, _ in model.named_modules() if "shortcut" in n}


def select_weights(model: nn.Module, layers: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of the regularized conv/linear layers, in model order.

    - ``all_convs_except_shortcut``: every Conv2d except residual projections (``model.shortcut_convs()``)
    - ``prunable``: producer convs and consumers (convs, or the VGG linear head) of the channel groups
    - ``all_convs``: every Conv2d
    - ``all``: every Conv2d and Linear
    """
    if layers == "prunable":
        wanted = {s.module for g in _groups(model) for s in g.slots if s.role in ("producer", "consumer")}
        picked = [(n, m) for n, m in model.named_modules() if n in wanted]
    elif layers == "all":
        picked = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    else:
        picked = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        if layers == "all_convs_except_shortcut":
            shortcuts = _shortcut_convs(model)
            picked = [(n, m) for n, m in picked if n not in shortcuts]
    if not picked:
        raise UserError("regularizer.layers", f"{layers!r} selects no conv/linear layer in this model")
    return picked


def select_bns(model: nn.Module, layers: str) -> list[tuple[str, nn.Module]]:
    """``all``: every BatchNorm2d; ``prunable``: the BNs of the channel groups."""
    wanted = {s.module for g in _groups(model) for s in g.role("norm")} if layers == "prunable" else None
    picked = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.weight is not None and (wanted is None or n in wanted)
    ]
    if not picked:
        raise UserError("regularizer.layers", f"{layers!r} selects no BatchNorm with affine scale in this model")
    return picked


# --------------------------------------------------------------------------- regularizers

REGULARIZERS = Registry("regularizer", "regularizer.name")


def _lam(default: float, doc: str = "strength lambda of the penalty"):
    return Float("lam", default, doc, lo=0.0)


WEIGHT_LAYERS_OPTION = Choice(
    "layers",
    "all_convs_except_shortcut",
    WEIGHT_LAYERS,
    "which conv/linear weights are regularized (shortcut = residual projections)",
)
BN_LAYERS_OPTION = Choice(
    "layers", "all", BN_LAYERS, "all: every BatchNorm2d; prunable: only the BNs of channel groups"
)
INIT_GAMMA = Float(
    "init_gamma", 0.5, "BN scales set to this when the stage starts; null keeps the current ones", nullable=True
)


@REGULARIZERS.register("none")
class Regularizer:
    """Base class, and the ``none`` regularizer: penalty() == 0, no cost."""

    name = "none"
    options: tuple = ()

    def __init__(self, model: nn.Module, **hparams):
        self.hparams = check_block(hparams, self.options, "regularizer")
        self.layer_names: list[str] = []
        p = next(model.parameters(), None)
        self._zero = torch.zeros(
            (), device=p.device if p is not None else None, dtype=p.dtype if p is not None else None
        )

    def penalty(self) -> torch.Tensor:
        """lambda * R(W), a differentiable 0-dim tensor."""
        return self._zero

    edits_gradients = False  # True: ``before_step`` runs between ``backward()`` and ``optimizer.step()``

    def before_step(self) -> None:
        """Called after ``backward()``, before ``optimizer.step()`` (when ``edits_gradients``): edit the gradients."""

    def after_step(self) -> None:
        """Called after ``optimizer.step()``."""

    def value(self) -> float:
        """The current penalty as a float (recomputed under no_grad)."""
        with torch.no_grad():
            return float(self.penalty())

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({opts}; {len(self.layer_names)} layers)"


class _WeightRegularizer(Regularizer, metaclass=abc.ABCMeta):
    """Holds the selected conv/linear weights, bucketed by shape."""

    def __init__(self, model: nn.Module, **hparams):
        super().__init__(model, **hparams)
        picked = select_weights(model, self.hparams["layers"])
        self.layer_names = [n for n, _ in picked]
        buckets: dict[tuple, list[nn.Module]] = {}
        for _, m in picked:  # modules, not tensors: survives model.to(...) and weight reassignment
            buckets.setdefault(tuple(_as_4d(m.weight).shape), []).append(m)
        self._buckets = list(buckets.values())
        self.lam = self.hparams["lam"]

    def penalty(self) -> torch.Tensor:
        total = None
        for modules in self._buckets:
            r = self.layer_term(_stack([m.weight for m in modules]))
            total = r if total is None else total + r
        return self.lam * total

    @abc.abstractmethod
    def layer_term(self, w: torch.Tensor) -> torch.Tensor:
        """R of a stack of same-shape layers, w: (L, O, I, kh, kw) -> 0-dim."""


@REGULARIZERS.register("l1")
class L1(_WeightRegularizer):
    """lam * sum |W| over the selected weights (default: every conv and linear)."""

    options = (_lam(1e-5), replace(WEIGHT_LAYERS_OPTION, default="all"))

    def layer_term(self, w):
        return w.abs().sum()


GROUPING = Choice(
    "grouping", "feature", ("feature", "filter"), "feature: g = W[:, i] (input channel); filter: g = W[o]"
)


@REGULARIZERS.register("group_lasso")
class GroupLasso(_WeightRegularizer):
    """lam * sum_g ||W_g||_2; filter: g = W[o], feature: g = W[:, i]."""

    options = (_lam(1e-4), GROUPING, WEIGHT_LAYERS_OPTION)

    def layer_term(self, w):
        dims = (2, 3, 4) if self.hparams["grouping"] == "filter" else (1, 3, 4)
        return _l2(w, dims).sum()


@REGULARIZERS.register("hgsr")
class HGSR(_WeightRegularizer):
    """Hierarchical group sparse regularization (Mitsuno & Kurita 2020), official mix:

    lam * ( mix * R_hier + (1 - mix) * ||W||_1 ),
    R_hier = sum_g (sum_{k in g} n(w_k))^2        (form: squared, r_SQ)
           = sum_g sqrt(sum_{k in g} n(w_k))      (form: sqrt, r_SR)
    n(w) = ||w||_2 (kernel_norm: l2) or sqrt(||w||_1) (kernel_norm: l1half).
    """

    options = (
        _lam(1e-3),
        Float("mix", 0.5, "weight of R_hier against the L1 term", lo=0.0, hi=1.0),
        GROUPING,
        Choice("form", "squared", ("squared", "sqrt"), "squared: r_SQ = sum_g (sum_k n(w_k))^2; sqrt: r_SR"),
        Choice("kernel_norm", "l2", ("l2", "l1half"), "n(w) of a kernel: l2 = ||w||_2; l1half = sqrt(||w||_1)"),
        WEIGHT_LAYERS_OPTION,
    )

    def layer_term(self, w):
        hp, mix = self.hparams, self.hparams["mix"]
        out = None
        if mix > 0:
            if hp["kernel_norm"] == "l2":
                k = _l2(w, (3, 4))  # (L, O, I)
            else:
                k = _safe_sqrt(w.abs().sum((3, 4)))
            s = k.sum(1 if hp["grouping"] == "feature" else 2)  # group sums: (L, I) or (L, O)
            r = s.square().sum() if hp["form"] == "squared" else _safe_sqrt(s).sum()
            out = r if mix == 1 else mix * r
        if mix < 1:
            l1 = (1 - mix) * w.abs().sum()
            out = l1 if out is None else out + l1
        return out


class _BNRegularizer(Regularizer):
    """Holds the selected BN scales; optionally sets them to ``init_gamma`` at construction.

    ``init_gamma`` (default 0.5, as both papers, which sparse-train from scratch) overwrites the
    regularized gammas of the model it is given: when sparse-training from pretrained weights,
    set it to null to keep the pretrained scales."""

    def __init__(self, model: nn.Module, **hparams):
        super().__init__(model, **hparams)
        picked = select_bns(model, self.hparams["layers"])
        self.layer_names = [n for n, _ in picked]
        self._bns = [m for _, m in picked]
        self.lam = self.hparams["lam"]
        if self.hparams["init_gamma"] is not None:
            with torch.no_grad():
                for m in self._bns:
                    m.weight.fill_(self.hparams["init_gamma"])

    def gammas(self) -> torch.Tensor:
        """All regularized BN scales, concatenated (differentiable)."""
        if len(self._bns) == 1:
            return self._bns[0].weight
        return torch.cat([m.weight for m in self._bns])


@REGULARIZERS.register("bn_l1")
class BNL1(_BNRegularizer):
    """Network Slimming: lam * sum_c |gamma_c| over the selected BN layers."""

    options = (_lam(1e-4, "lambda (1e-4 for VGG, 1e-5 for ResNet)"), BN_LAYERS_OPTION, INIT_GAMMA)

    def penalty(self):
        return self.lam * self.gammas().abs().sum()


@REGULARIZERS.register("polarization")
class Polarization(_BNRegularizer):
    """Zhuang et al. 2020: lam * (t * ||gamma||_1 - ||gamma - mean(gamma)||_1), gamma clamped to [0, 1]."""

    options = (
        _lam(5e-5, "lambda (ResNet-56: 5e-5; VGG-16: 3e-5)"),
        Float("t", 1.4, "weight of the L1 term against the spread (ResNet-56: 1.4; VGG-16: 1.5)", lo=0.0),
        BN_LAYERS_OPTION,
        INIT_GAMMA,
    )

    def penalty(self):
        g = self.gammas()
        return self.lam * (self.hparams["t"] * g.abs().sum() - (g - g.mean()).abs().sum())

    def after_step(self):
        with torch.no_grad():
            for m in self._bns:
                m.weight.clamp_(0.0, 1.0)


def build_regularizer(cfg, model: nn.Module) -> Regularizer:
    """``cfg``: a mapping (dict or OmegaConf DictConfig) ``{"name": ..., **hparams}``; None means ``none``."""
    if cfg is None:
        return Regularizer(model)
    return REGULARIZERS.build(cfg, model)


# --------------------------------------------------------------------------- sparsity statistics


def sparsity_stats(model: nn.Module, threshold: float = ZERO_THRESHOLD) -> tuple[dict, list[dict]]:
    """Weight and group sparsity of every Conv2d and Linear layer (a Linear counts as 1x1 kernels).

    A weight is zero when |w| < threshold (docs/methods.md: 1e-3); a group when its L2 norm is.
    Per layer: ``layer`` (module name), ``kind`` (conv / linear), counts ``n_weights``,
    ``n_feature_groups`` (= I, groups W[:, i]), ``n_filter_groups`` (= O, groups W[o]) and the
    zero fractions in [0, 1] ``weight_sparsity``, ``feature_group_sparsity``, ``filter_group_sparsity``.
    ``overall``: ``zero_threshold``, the same counts summed and fractions pooled (zero count / total)
    over all conv + linear layers, and again with a ``conv_`` prefix over the conv layers only.
    """
    per_layer, tot = [], {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            w = _as_4d(m.weight.detach())
            counts = {
                "weight": (w.numel(), int((w.abs() < threshold).sum())),
                "feature_group": (w.shape[1], int((_l2(w, (0, 2, 3)) < threshold).sum())),
                "filter_group": (w.shape[0], int((_l2(w, (1, 2, 3)) < threshold).sum())),
            }
            kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
            row = {"layer": name, "kind": kind}
            for key, (n, nz) in counts.items():
                row[f"n_{key}s"] = n
                row[f"{key}_sparsity"] = nz / n
                for prefix in ("", "conv_") if kind == "conv" else ("",):
                    a = tot.setdefault((prefix, key), [0, 0])
                    a[0] += n
                    a[1] += nz
            per_layer.append(row)
    overall: dict = {"zero_threshold": threshold}
    for (prefix, key), (n, nz) in tot.items():
        overall[f"{prefix}n_{key}s"] = n
        overall[f"{prefix}{key}_sparsity"] = nz / n if n else 0.0
    return overall, per_layer


__all__ = [
    "Regularizer",
    "REGULARIZERS",
    "build_regularizer",
    "sparsity_stats",
    "select_weights",
    "select_bns",
    "ZERO_THRESHOLD",
]
