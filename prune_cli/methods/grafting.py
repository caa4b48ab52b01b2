"""Filter grafting (Meng et al., CVPR 2020): re-activate weak filters during training.

Not pruning: the architecture never changes. Several networks train in parallel (different data
order and/or lr schedules, :func:`lr_schedules`); after every epoch each network takes weights from
another one (:func:`graft_ring`, "external" grafting, the paper's best variant). Two weaker sources
of new information are provided for the paper's ablation: Gaussian noise (:func:`graft_noise`) and
the network's own high-entropy filters (:func:`graft_internal`).

Entropy (:func:`layer_entropy`, :func:`filter_entropy`): histogram of the weights in ``bins`` (10)
equal-width bins spanning [min, max] (the max falls in the last bin), ``p_k`` = fraction of weights
in bin k, ``H = -sum_k p_k ln p_k`` (natural log, ``0 ln 0 = 0``). A constant tensor has H = 0.
(The official code's bins are half-open [lo, hi), which leaves the maximum weight out of every
bin; we count it, so our H differs from theirs by that one weight.)

Weighting: ``alpha = (A / pi) * arctan(c * (H_self - H_other)) + 0.5`` (A = 0.4, c = 500), so
alpha lies in (0.3, 0.7): the layer with more information keeps more of itself.

What :func:`graft_ring` grafts (``scope``):

- ``"conv"``: conv weights (and biases) only, each with its own alpha: the literal description.
- ``"conv_bn"``: also the BatchNorm that follows each conv (weight, bias, running mean and var), with
  that conv's alpha: what the official VGG code does. Keeping BN with its conv keeps the
  normalisation matched to the mixed filters.
- ``"all"`` (default): also every Linear layer (own alpha from its own weight entropy) and a BN
  after it. The official ResNet code mixes every state-dict entry; it gives the classifier the
  alpha of the last conv, we give it its own.

``num_batches_tracked`` is never touched. A BN "follows" a layer when it comes right after it in
module registration order and has as many features as the layer has outputs (true of every model
in ``prune_cli.models``).

A plug-in of the training engine: the ``graft`` block of every training stage switches on the
:class:`Grafting` training hook (its partner networks, their lr schedules, the graft after each epoch).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from prune_cli.core.options import Choice, Float, Int, Section
from prune_cli.core.seeds import derived, epoch_generator
from prune_cli.engine.hooks import TRAINING_HOOKS, TrainingHook
from prune_cli.importance.histogram import histogram_entropy
from prune_cli.models import build_model

__all__ = [
    "Grafting",
    "layer_entropy",
    "filter_entropy",
    "graft_alpha",
    "graft_layers",
    "graft_ring",
    "graft_noise",
    "graft_internal",
    "lr_schedules",
]

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


# ---------------------------------------------------------------------------------------------
# entropy and alpha


def layer_entropy(w: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Entropy of the histogram of ALL weights of a layer (a 0-d tensor)."""
    return histogram_entropy(w.detach().float().reshape(1, -1), bins)[0]


def filter_entropy(w: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Entropy per filter (output channel): ``[O]``, each histogram over that filter's own min..max."""
    return histogram_entropy(w.detach().float().reshape(w.shape[0], -1), bins)


def graft_alpha(h_self, h_other, A: float = 0.4, c: float = 500.0):
    """``(A / pi) * arctan(c * (h_self - h_other)) + 0.5``; floats in, float out, tensors in, tensor out."""
    if isinstance(h_self, torch.Tensor) or isinstance(h_other, torch.Tensor):
        return (A / math.pi) * torch.atan(c * (torch.as_tensor(h_self) - torch.as_tensor(h_other))) + 0.5
    return (A / math.pi) * math.atan(c * (h_self - h_other)) + 0.5


# ---------------------------------------------------------------------------------------------
# which tensors are grafted


def graft_layers(model: nn.Module, scope: str = "all") -> list[tuple[str, str | None]]:
    """``[(weight layer name, name of the BN that follows it or None)]`` in registration order.

    scope "conv": Conv2d layers, no BN; "conv_bn": Conv2d layers with their BN; "all": Conv2d and
    Linear layers with their BN.
    """
    if scope not in ("conv", "conv_bn", "all"):
        raise ValueError(f"scope must be conv, conv_bn or all, not {scope!r}")
    kinds = (nn.Conv2d, nn.Linear) if scope == "all" else (nn.Conv2d,)
    out: list[list] = []
    prev = None  # the last module that was a weight layer or a BN
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prev = (name, m)
            if isinstance(m, kinds):
                out.append([name, None])
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if (
                scope != "conv"
                and prev is not None
                and isinstance(prev[1], kinds)
                and out
                and out[-1][0] == prev[0]
                and out[-1][1] is None
                and m.num_features == (prev[1].out_channels if isinstance(prev[1], nn.Conv2d) else prev[1].out_features)
            ):
                out[-1][1] = name
            prev = (name, m)
    return [(a, b) for a, b in out]


def _tensors(modules: dict, layer: str, bn: str | None) -> list[torch.Tensor]:
    m = modules[layer]
    ts = [m.weight] + ([m.bias] if m.bias is not None else [])
    if bn is not None:
        b = modules[bn]
        ts += [t for t in (getattr(b, k) for k in BN_TENSORS) if t is not None]
    return ts


# ---------------------------------------------------------------------------------------------
# external grafting: the ring


@torch.no_grad()
def graft_ring(
    models: list[nn.Module],
    A: float = 0.4,
    c: float = 500.0,
    scope: str = "all",
    bins: int = 10,
    round_decimals: int | None = None,
) -> list[dict[str, float]]:
    """External grafting after an epoch: every model m takes from model m-1 (model 0 from the last).

    For every grafted layer l (see ``scope`` in the module doc), from the PRE-graft weights of all
    models: ``alpha = graft_alpha(H(W_m,l), H(W_{m-1},l))`` and
    ``W_m,l <- alpha * W_m,l + (1 - alpha) * W_{m-1},l`` for the layer's weight and bias and its BN's
    weight, bias, running mean and running var. ``round_decimals=2`` rounds alpha as the official
    code does (default: the exact formula). Returns, per model, ``{layer name: alpha}``.
    """
    n = len(models)
    if n < 2:
        raise ValueError("grafting needs at least two models")
    layers = graft_layers(models[0], scope)
    mods = [dict(m.named_modules()) for m in models]
    ent = [[layer_entropy(md[layer].weight, bins) for layer, _ in layers] for md in mods]
    ent = [torch.stack(e).tolist() if e else [] for e in ent]  # one sync per model
    new: list[list[torch.Tensor]] = []
    alphas: list[dict[str, float]] = []
    for m in range(n):
        src = (m - 1) % n
        row, new_m = {}, []
        for i, (layer, bn) in enumerate(layers):
            a = graft_alpha(ent[m][i], ent[src][i], A, c)
            if round_decimals is not None:
                a = round(a, round_decimals)
            row[layer] = a
            for mine, other in zip(_tensors(mods[m], layer, bn), _tensors(mods[src], layer, bn)):
                new_m.append(mine * a + other.to(mine.device) * (1.0 - a))
        new.append(new_m)
        alphas.append(row)
    for m in range(n):  # write only after every new tensor was computed from pre-graft weights
        targets = [t for layer, bn in layers for t in _tensors(mods[m], layer, bn)]
        for t, v in zip(targets, new[m]):
            t.copy_(v)
    return alphas


# ---------------------------------------------------------------------------------------------
# the ablation variants


@torch.no_grad()
def graft_noise(
    model: nn.Module,
    epoch: int,
    sigma0: float = 0.01,
    decay: float = 0.95,
    threshold: float = 0.1,
    generator: torch.Generator | None = None,
) -> dict[str, int]:
    """Variant "noise": add Gaussian noise to the small-L1-norm filters of every conv.

    A filter is *small* when its L1 norm is below ``threshold`` x the mean filter L1 norm of its layer.
    Each weight of a small filter gets ``N(0, sigma_e^2)`` noise with ``sigma_e = sigma0 * decay**epoch``
    (so the variance decays as ``decay**(2 epoch)``). Returns ``{conv name: number of filters touched}``.
    """
    sigma = sigma0 * decay**epoch
    touched = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        w = m.weight
        l1 = w.abs().flatten(1).sum(1)
        small = l1 < threshold * l1.mean()
        k = int(small.sum())
        if k:
            noise = torch.randn(
                (k,) + tuple(w.shape[1:]),
                generator=generator,
                dtype=w.dtype,
                device="cpu" if generator is None else generator.device,
            )
            w[small] += sigma * noise.to(w.device)
        touched[name] = k
    return touched


@torch.no_grad()
def graft_internal(
    model: nn.Module,
    share: float = 0.1,
    bins: int = 10,
    with_bn: bool = True,
    blend: bool = False,
    A: float = 0.4,
    c: float = 500.0,
) -> dict[str, list[tuple[int, int]]]:
    """Variant "internal": per conv, copy the highest-entropy filters onto the lowest-entropy ones.

    ``n = max(1, floor(share * O))`` filters per conv (at most ``O // 2``; convs with one filter are
    skipped; ``share = 0`` does nothing). With filter entropies sorted ascending (ties: lower index
    first), the i-th lowest-entropy filter receives the i-th highest-entropy one:
    ``W[dst] <- W[src]`` (``blend=True``: ``alpha * W[dst] + (1 - alpha) * W[src]`` with
    ``alpha = graft_alpha(H_dst, H_src)``). ``with_bn``: the following BN's entries (weight, bias,
    running stats) of ``dst`` get the same treatment. Returns ``{conv name: [(src, dst), ...]}``.
    """
    bn_of = dict(graft_layers(model, "conv_bn"))
    modules = dict(model.named_modules())
    pairs = {}
    for name, m in modules.items():
        if not isinstance(m, nn.Conv2d) or share <= 0:
            continue
        o = m.out_channels
        n = min(max(1, int(share * o)), o // 2)
        if n == 0:
            continue
        h = filter_entropy(m.weight, bins)
        order = torch.sort(h, stable=True).indices  # ascending, ties by index
        dst, src = order[:n], torch.flip(order, [0])[:n]
        if blend:
            a = graft_alpha(h[dst], h[src], A, c).to(m.weight.dtype)
        tensors = [m.weight] + ([m.bias] if m.bias is not None else [])
        if with_bn and bn_of.get(name):
            bn = modules[bn_of[name]]
            tensors += [t for t in (getattr(bn, k) for k in BN_TENSORS) if t is not None]
        for t in tensors:
            s = t[src].clone()
            if blend:
                shape = (-1,) + (1,) * (t.dim() - 1)
                t[dst] = a.view(shape) * t[dst] + (1 - a.view(shape)) * s
            else:
                t[dst] = s
        pairs[name] = list(zip(src.tolist(), dst.tolist()))
    return pairs


# ---------------------------------------------------------------------------------------------
# per-model lr schedules


def lr_schedules(
    n_models: int, kind: str, base_lr: float, epochs: int, step_size: int | None = None, gamma: float = 0.1
) -> list[Callable[[float], float]]:
    """One ``epoch -> lr`` function per model (``epoch`` may be fractional, ``epoch + step / steps``,
    for per-step annealing as the official code's cosine does).

    - ``"same"``: every model the same cosine annealing, ``base_lr * (1 + cos(pi * e / epochs)) / 2``
      (official code, ``--cos``). Diversity comes only from initialisation and data order.
    - ``"slr"``: every model the same step schedule, ``base_lr * gamma ** floor(e / step_size)``,
      ``step_size`` default ``round(0.3 * epochs)``: the official default ``StepLR(60, 0.1)`` over 200
      epochs (lr 0.1, 0.01 at 60, 1e-3 at 120, 1e-4 at 180).
    - ``"dlr"``: different initial lr per model, then cosine annealing (official ``--difflr --cos``):
      model m (1-based, of N) starts at ``base_lr * s_m``, ``s_m = (1 + cos(pi * (N - m) / N)) / 2``
      (N = 2: 0.5x and 1x; N = 3: 0.25x, 0.75x, 1x), i.e. the initial lrs are samples of one
      half-cosine; ``lr_m(e) = base_lr * s_m * (1 + cos(pi * e / epochs)) / 2``.
    """
    if n_models < 1 or epochs < 1:
        raise ValueError("n_models and epochs must be >= 1")

    def cosine(scale: float) -> Callable[[float], float]:
        return lambda e: base_lr * scale * (1 + math.cos(math.pi * min(e, epochs) / epochs)) / 2

    if kind == "same":
        return [cosine(1.0) for _ in range(n_models)]
    if kind == "slr":
        step = step_size or max(1, round(0.3 * epochs))
        return [(lambda e: base_lr * gamma ** math.floor(e / step)) for _ in range(n_models)]
    if kind == "dlr":
        return [cosine((1 + math.cos(math.pi * (n_models - m) / n_models)) / 2) for m in range(1, n_models + 1)]
    raise ValueError(f"lr schedule kind must be same, slr or dlr, not {kind!r}")


# ---------------------------------------------------------------------------------------------
# the training hook: schedule.<stage>.graft


BLOCK = Section(
    "graft",
    (
        Choice(
            "variant",
            "none",
            ("none", "external", "noise", "internal"),
            "filter grafting: none | external (N networks, ring) | noise | internal",
        ),
        Int("networks", 2, "external: networks trained side by side, each with its own data order", lo=2),
        Choice(
            "lr_schedules",
            "stage",
            ("stage", "slr", "dlr"),
            "stage: every network uses the stage's schedule | slr: shared step | dlr: per-network cosine",
        ),
        Float("A", 0.4, "alpha = (A / pi) * arctan(c * (H_m - H_(m-1))) + 0.5", lo=0.0),
        Float("c", 500.0, "the entropy-difference scale c of alpha", lo=0.0),
        Choice(
            "scope", "all", ("all", "conv_bn", "conv"), "layers grafted: all (conv + linear, with BN) | conv_bn | conv"
        ),
        Float("noise_sigma0", 0.01, "noise: std of the noise at epoch 0 ...", lo=0.0),
        Float("noise_decay", 0.95, "... times decay**epoch", lo=0.0, hi=1.0),
        Float("noise_threshold", 0.1, "noise: filters with L1 norm below this x the layer mean get noise", lo=0.0),
        Float(
            "internal_share",
            0.1,
            "internal: share of each layer's filters overwritten by its highest-entropy ones",
            lo=0.0,
            hi=0.5,
            lo_open=True,
        ),
    ),
    "filter grafting (Meng et al., CVPR 2020); variant none = off",
)


@TRAINING_HOOKS.register("graft")
class Grafting(TrainingHook):
    """Filter grafting in a training stage, as its ``graft`` block sets it (variant none: off)."""

    options = (BLOCK,)

    def __init__(self, settings):
        self.settings = settings  # the stage's graft block

    @classmethod
    def switched_on(cls, st) -> Grafting | None:
        graft = st.get("graft")  # None: a stage whose block does not declare grafting
        return cls(graft) if graft is not None and graft.variant != "none" else None

    def partners(self, model, *, copies: bool, seed: int, stage: str) -> list:
        """External grafting's other networks: new initialisations (seeded per network and stage), or copies of
        the model when finetuning."""
        if self.settings.variant != "external":
            return []
        partners = []
        for k in range(1, self.settings.networks):
            torch.manual_seed(derived(seed + k, stage))
            partner = copy.deepcopy(model) if copies else build_model(model.arch)
            partners.append(partner.to(next(model.parameters()).device))
        return partners

    def lr_functions(self, st, networks: int, epochs: int) -> list[Callable[[int], float]] | None:
        """slr / dlr: the per-network schedules of :func:`lr_schedules`; stage: the stage's own (None)."""
        if networks > 1 and self.settings.lr_schedules != "stage":
            return lr_schedules(networks, self.settings.lr_schedules, st.lr, epochs, gamma=st.gamma)
        return None

    def after_epoch(self, models: list, epoch: int, seed: int) -> None:
        """The graft after an epoch: the ring between the networks, or a single-network variant on the model."""
        g = self.settings
        if g.variant == "external":
            graft_ring(models, A=g.A, c=g.c, scope=g.scope)
        elif g.variant == "noise":
            generator = epoch_generator("cpu", seed, "graft", epoch)
            graft_noise(
                models[0],
                epoch,
                sigma0=g.noise_sigma0,
                decay=g.noise_decay,
                threshold=g.noise_threshold,
                generator=generator,
            )
        elif g.variant == "internal":
            graft_internal(models[0], share=g.internal_share, A=g.A, c=g.c)
