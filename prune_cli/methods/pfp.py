"""Provable Filter Pruning (PFP; Liebenwein et al., ICLR 2020): the numerical core as pure functions.

PFP scores the *input channels* j of every conv and linear layer l by their empirical sensitivity on a small
set S of images, allocates one global error eps across the layers to meet a budget of remaining weights, and
keeps, per layer, the channels a sample of the sensitivity distribution would pick. Removing input channel j
of layer l removes filter j (and its BN entry) of the layer that produces it. A pipeline stage calls, in turn:

1. :func:`output_units` (or its own hooks) and :func:`sample_size`: how many images S holds,
   ``|S| = ceil(c ln(8 eta_max eta / delta))`` capped at :func:`sample_cap` of the validation split.
2. :func:`input_sensitivity` per layer on that layer's input for the images of S: ``s`` (float64, [C_in]).
   Sensitivities of disjoint image sets combine by an elementwise maximum.
3. :func:`allocate` over the layers: eps and the kept input channels ``n_l`` (:func:`allocation_at` gives the
   allocation of a given eps).
4. Per layer, :func:`keep_top` (``PFPNet``, deterministic: the paper's CIFAR configs), :func:`keep_sampled`
   (``PFPNetRand``: a multinomial sample, reweighted) or :func:`keep_top_sampled` (``PFPNetTop``).

Sensitivity. The input a is split into ``a+ = max(a, 0)`` and ``a- = max(-a, 0)``, two inputs; the weights into
``W+ = max(W, 0)`` and ``W- = min(W, 0)``. All four pairs count: for input part a in {a+, a-} and weight part
V in {W+, W-}, ``z_V(f, p) = sum_{j', t'} V(f, j', t') a(j', t'; p)`` (no bias), and for every weight of V
``g = V(f, j, t) a(j, t; p) / z_V(f, p)`` (>= 0), with ``|z_V| <= eps_float32`` counted as infinity (g = 0).
``s_j = max g`` over images, parts, filters f, output positions p and kernel taps t of channel j.

Allocation (one eps for all layers; ``delta = 1e-16``, ``c = 3``):
``alpha_l = 2 c ln(8 (P_l + 1) k_l / delta)``, ``C_l = alpha_l sum_j s_j``,
``m_l = ceil(3 (6 + 2 eps) C_l / eps^2)`` (at least 1),
``n_l = min(C_in_l, max(1, ceil(sum_j 1 - (1 - p_j)^m_l)))`` with ``p_j = s_j / sum s`` (``n_l = 1`` if
``sum s = 0``), and the producer of layer l (layer l-1 by default) loses ``C_in_l - n_l`` filters (at least 1
stays). eps is the root, in [1e-300, 1e150], of ``budget - sum_l n_l out_l k_l``, a nonincreasing step
function of eps; it is found by bisection in log(eps) down to float resolution, and of the two sides of the
step the one nearer the budget is returned (as Brent's method on the step function does). A budget outside
the reachable range gives the nearer end: every channel (eps = 1e-300) or one channel per layer (1e150).

Randomized. ``m'`` draws from Multinomial(p), with ``m'`` the smallest number of draws whose expected number
of distinct channels, rounded up, reaches ``min(n, nnz - 1)`` (nnz: channels with p > 0); a drawn channel j
is kept and its weights are scaled by ``count_j / (m' p_j)``, an unbiased estimate of the layer's output.
Probabilities at or below float32 eps are set to 0 before sampling (those channels are never drawn).

Every function runs on the device of its tensor arguments (CPU or CUDA, same code); sensitivities and
probabilities are float64.

Notes on the official implementation (torchprune): it computes in float32, here z, the allocation and the
probabilities are float64 (expected counts within 1e-9 above an integer round down to it, so that float
sums such as ``sum p = 1 + 1e-16`` do not gain a channel); it takes some m' with the right rounded count (a
float bisection), here the smallest; its allocator assumes a chain of layers, every input prunable, while
``producers`` and ``prunable`` here let a stage state its channel groups (the defaults are the chain); a
layer without sensitivity (sum s = 0) keeps one channel there by accident of a NaN, here by rule.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.core.options import Choice, Int
from prune_cli.core.seeds import derived
from prune_cli.models.layers import GatherConv, GatherLinear, convert
from prune_cli.stages.base import STAGES
from prune_cli.stages.prune import Prune, check_selection, check_steps
from prune_cli.structure.channels import structure
from prune_cli.structure.counting import layer_pixels
from prune_cli.structure.selection import matching

DELTA = 1e-16  # failure probability delta of the sample size and of alpha
C_CONSTANT = 3.0  # c in |S| = ceil(c ln(8 eta_max eta / delta)) and alpha = 2 c ln(...)
K_CONSTANT = 3.0  # the 3 in m = ceil(3 (6 + 2 eps) C / eps^2)
EPS_MIN, EPS_MAX = 1e-300, 1e150  # the bracket of the global eps
Z_EPS = float(torch.finfo(torch.float32).eps)  # |z| and p at or below this count as infinity / zero
DISTINCT_TOL = 1e-9  # expected counts within this above an integer round down to it (float64 sums of p)
MAX_ELEMENTS = 2**22  # elements of one chunk of the max-product in input_sensitivity


# ------------------------------------------------------------------------------------------------ |S|


def sample_size(output_units: Sequence[int], available: int, *, delta: float = DELTA, c: float = C_CONSTANT) -> int:
    """The number of images in S: ``ceil(c ln(8 eta_max eta / delta))``, at most ``available``.

    ``output_units``: the output units of every conv and linear layer for one image (conv: C_out H_out W_out,
    linear: out_features), every such layer counted (first conv, residual projections and classifier too);
    ``eta`` is their sum and ``eta_max`` the largest. ``available``: the cap, :func:`sample_cap` of the
    validation split S is drawn from. CIFAR ResNet-56 gives 186 and VGG-16 188.
    """
    eta, eta_max = float(sum(output_units)), float(max(output_units))
    return max(0, min(int(available), math.ceil(c * math.log(8.0 * eta_max * eta / delta))))


def sample_cap(num_valid: int) -> int:
    """At most half of the validation split goes into S: ``ceil(0.5 num_valid)``."""
    return math.ceil(0.5 * num_valid)


def output_units(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Output units (elements of one image's output) of every ``nn.Conv2d`` and ``nn.Linear`` of ``model``, in
    module order, from one forward of ``x[:1]`` in eval mode (no grad; the model's mode is restored). A module
    called several times counts its largest output."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    units = dict.fromkeys(layers, 0)

    def hook(module, _inputs, output):
        units[module] = max(units[module], output[0].numel())

    handles = [m.register_forward_hook(hook) for m in layers]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return [units[m] for m in layers]


# ----------------------------------------------------------------------------------------- sensitivity


def _check_conv(layer: nn.Conv2d) -> None:
    if layer.groups != 1:
        raise ValueError(f"PFP scores dense convs only; this conv has groups={layer.groups}")
    if isinstance(layer.padding, str):
        raise ValueError(f"give the conv's padding as numbers, not {layer.padding!r}")
    if layer.padding_mode != "zeros":
        raise ValueError(f"PFP assumes zero padding; this conv pads with {layer.padding_mode!r}")


def _max_product(inv: torch.Tensor, patches: torch.Tensor, max_elements: int) -> torch.Tensor:
    """``M[f, r] = max_p patches[r, p] * inv[f, p]`` (both >= 0), in chunks of at most ``max_elements``."""
    filters, positions = inv.shape
    rows = patches.shape[0]
    pc = min(positions, max(1, max_elements // rows))
    fc = max(1, max_elements // (rows * pc))
    out = inv.new_zeros(filters, rows)
    for p0 in range(0, positions, pc):
        part = patches[None, :, p0 : p0 + pc]
        for f0 in range(0, filters, fc):
            prod = inv[f0 : f0 + fc, None, p0 : p0 + pc] * part
            out[f0 : f0 + fc] = torch.maximum(out[f0 : f0 + fc], prod.amax(-1))
    return out


def input_sensitivity(
    layer: nn.Conv2d | nn.Linear,
    x: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    max_elements: int = MAX_ELEMENTS,
) -> torch.Tensor:
    """PFP's empirical sensitivity ``s_j`` of every input channel j of ``layer`` over the images in ``x``.

    ``x``: the layer's input (as captured by a forward pre-hook) for N images, ``[N, C_in, H, W]`` for a conv,
    ``[N, C_in]`` (or ``[..., C_in]``, every row one sample) for a linear layer. Returns float64 ``[C_in]`` on
    ``x``'s device. Images are processed one at a time; the max over positions is taken in chunks of at most
    ``max_elements`` (filters x kernel rows x positions), so memory stays bounded. ``z`` and its eps test are
    float64; ``dtype`` is the precision of the max over positions, the bulk of the work (float32, the official
    precision, by default: about 5x faster on a CPU than float64, relative error about 1e-7). The conv's
    stride, padding and dilation apply; a grouped conv, string padding or a non-zero padding mode raises
    ``ValueError``. The result is the maximum of the per-image results, so sensitivities of batches combine
    by ``torch.maximum``.
    The cost is about twice the layer's MACs per image (four times where the input has negative entries).
    """
    if isinstance(layer, nn.Conv2d):
        _check_conv(layer)
        if x.dim() != 4:
            raise ValueError(f"a conv's input must be [N, C, H, W], not {tuple(x.shape)}")
    elif isinstance(layer, nn.Linear):
        x = x.reshape(-1, x.shape[-1])
    else:
        raise TypeError(f"PFP scores nn.Conv2d and nn.Linear layers, not {type(layer).__name__}")
    cin = layer.weight.shape[1]
    if x.shape[1] != cin:
        raise ValueError(f"the input has {x.shape[1]} channels, the layer expects {cin}")
    with torch.no_grad():
        w = layer.weight.detach().to(device=x.device, dtype=torch.float64).reshape(layer.weight.shape[0], -1)
        sides = [(w.clamp(min=0), w > 0), (w.clamp(max=0), w < 0)]  # (W+, where W > 0), (W-, where W < 0)
        sides = [(v, mask) for v, mask in sides if bool(mask.any())]
        w_abs = w.abs().to(dtype)
        best = w.new_zeros(w.shape[1])  # max over images, parts and filters, per (channel, tap) row
        for image in x:
            image = image.to(torch.float64)
            parts = [image.clamp(min=0)]
            if bool((image < 0).any()):
                parts.append((-image).clamp(min=0))
            for a in parts:
                if isinstance(layer, nn.Conv2d):
                    kw = dict(dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
                    patches = F.unfold(a[None], layer.kernel_size, **kw)[0]  # [C_in k, P]
                else:
                    patches = a[:, None]  # [C_in, 1]
                work = patches.to(dtype)
                for v, mask in sides:
                    z = (v @ patches).abs()  # |z_V(f, p)|, no bias
                    inv = torch.where(z > Z_EPS, 1.0 / z.clamp(min=Z_EPS), torch.zeros_like(z)).to(dtype)
                    g = w_abs * _max_product(inv, work, max_elements)  # max over p of V a / z_V
                    g = torch.where(mask, g.double(), torch.zeros_like(w))
                    best = torch.maximum(best, g.amax(0))
        return best.view(cin, -1).amax(1)


# ------------------------------------------------------------------------------------------ allocation


def alpha(positions: int, kernel_size: int, *, delta: float = DELTA, c: float = C_CONSTANT) -> float:
    """``alpha_l = 2 c ln(8 (P_l + 1) k_l / delta)``: ``positions`` P_l (1 for linear), ``kernel_size`` kh kw."""
    return 2.0 * c * math.log(8.0 * (positions + 1) * kernel_size / delta)


def layer_constant(
    s: torch.Tensor, positions: int, kernel_size: int, *, delta: float = DELTA, c: float = C_CONSTANT
) -> float:
    """``C_l = alpha_l sum_j s_j``, the layer's coefficient of the sample complexity."""
    return alpha(positions, kernel_size, delta=delta, c=c) * float(s.double().sum())


def sample_complexity(eps: float, constants: torch.Tensor) -> torch.Tensor:
    """``m_l = ceil(3 (6 + 2 eps) C_l / eps^2)``, at least 1 (float64; inf where eps^2 underflows)."""
    constants = torch.as_tensor(constants, dtype=torch.float64)
    with torch.no_grad():
        m = torch.ceil(K_CONSTANT * (6.0 + 2.0 * eps) * constants / (eps * eps))
    return torch.where((constants > 0) & (m >= 1), m, torch.ones_like(m))


def expected_distinct(p: torch.Tensor, m: torch.Tensor | float) -> torch.Tensor:
    """Expected number of distinct channels in m draws from p: ``sum_j 1 - (1 - p_j)^m`` over the last dim.

    ``p``: [..., C] (rows need not sum to 1); ``m``: a number or a tensor broadcasting against ``p[..., 0]``;
    ``m = inf`` gives the number of channels with p > 0. float64.
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    m = torch.as_tensor(m, dtype=torch.float64, device=p.device).unsqueeze(-1)
    positive = p > 0
    vals = -torch.expm1(m * torch.log1p(-p.clamp(0.0, 1.0)))
    vals = torch.where(torch.isinf(m).expand_as(p), positive.double(), vals)
    return torch.where(positive, vals, torch.zeros_like(vals)).sum(-1)


def _round_up(expected: torch.Tensor) -> torch.Tensor:
    return torch.ceil(expected - DISTINCT_TOL)


class Allocation(NamedTuple):
    """The allocation of one eps; lists have one entry per layer, in the order given."""

    eps: float
    kept: list[int]  # n_l, input channels kept (C_in_l where the input is not prunable)
    out: list[int]  # out_l after the producers lost their filters
    size: int  # sum_l n_l out_l k_l: the remaining conv/linear weights
    samples: list[float]  # m_l (inf where eps^2 underflows; 0 where not prunable)
    in_range: bool  # whether the budget lay between the smallest and the largest reachable size


class _Problem:
    """The per-layer constants of an allocation, so that each eps costs a few vectorised operations."""

    def __init__(
        self, sensitivities, positions, kernel_sizes, in_channels, out_channels, producers, prunable, delta, c
    ):
        n = len(in_channels)
        lengths = {len(positions), len(kernel_sizes), len(out_channels), len(sensitivities)}
        if lengths != {n}:
            raise ValueError("sensitivities, positions, kernel_sizes, in_channels and out_channels differ in length")
        self.prunable = [True] * n if prunable is None else [bool(b) for b in prunable]
        self.producers = [None, *range(n - 1)] if producers is None else list(producers)
        if len(self.prunable) != n or len(self.producers) != n:
            raise ValueError("prunable and producers need one entry per layer")
        named = [q for q, ok in zip(self.producers, self.prunable) if ok and q is not None]
        if len(named) != len(set(named)):
            raise ValueError("two prunable layers name the same producer; give one consumer per producer")
        if any(not 0 <= q < n for q in named):
            raise ValueError("a producer index is out of range")
        self.cin = [int(v) for v in in_channels]
        self.cout = [int(v) for v in out_channels]
        self.k = [int(v) for v in kernel_sizes]
        self.probs = torch.zeros(n, max(self.cin), dtype=torch.float64)
        self.constants = torch.zeros(n, dtype=torch.float64)
        self.dead = torch.zeros(n, dtype=torch.bool)  # prunable layers with sum s = 0: n_l = 1
        for ell, s in enumerate(sensitivities):
            if not self.prunable[ell]:
                continue
            s = torch.as_tensor(s).detach().double().cpu().flatten()
            if s.numel() != self.cin[ell]:
                raise ValueError(f"layer {ell}: {s.numel()} sensitivities for {self.cin[ell]} input channels")
            total = float(s.sum())
            self.constants[ell] = layer_constant(s, positions[ell], self.k[ell], delta=delta, c=c)
            if total > 0:
                self.probs[ell, : s.numel()] = s / total
            else:
                self.dead[ell] = True
        self.mask = torch.tensor(self.prunable)

    def at(self, eps: float, in_range: bool = True) -> Allocation:
        m = sample_complexity(eps, self.constants)
        distinct = _round_up(expected_distinct(self.probs, m))
        distinct = torch.where(self.dead, torch.ones_like(distinct), distinct)
        kept = [int(min(c, max(1.0, d))) if ok else c for c, d, ok in zip(self.cin, distinct.tolist(), self.prunable)]
        out = list(self.cout)
        for ell, q in enumerate(self.producers):
            if q is not None and self.prunable[ell]:
                out[q] -= self.cin[ell] - kept[ell]
        out = [max(1, o) for o in out]
        size = sum(n * o * k for n, o, k in zip(kept, out, self.k))
        samples = torch.where(self.mask, m, torch.zeros_like(m)).tolist()
        return Allocation(float(eps), kept, out, size, samples, in_range)


def allocation_at(
    eps: float,
    sensitivities: Sequence[torch.Tensor | None],
    positions: Sequence[int],
    kernel_sizes: Sequence[int],
    in_channels: Sequence[int],
    out_channels: Sequence[int],
    *,
    producers: Sequence[int | None] | None = None,
    prunable: Sequence[bool] | None = None,
    delta: float = DELTA,
    c: float = C_CONSTANT,
) -> Allocation:
    """The allocation of a given ``eps``; the arguments are those of :func:`allocate`."""
    problem = _Problem(sensitivities, positions, kernel_sizes, in_channels, out_channels, producers, prunable, delta, c)
    return problem.at(eps)


def allocate(
    sensitivities: Sequence[torch.Tensor | None],
    positions: Sequence[int],
    kernel_sizes: Sequence[int],
    in_channels: Sequence[int],
    out_channels: Sequence[int],
    budget: float,
    *,
    producers: Sequence[int | None] | None = None,
    prunable: Sequence[bool] | None = None,
    side: str = "nearest",
    size_of: Callable[[Allocation], float] | None = None,
    delta: float = DELTA,
    c: float = C_CONSTANT,
) -> Allocation:
    """Solve the global eps so that the remaining weights ``sum_l n_l out_l k_l`` meet ``budget``.

    Per layer l (conv and linear layers, in module order): ``sensitivities[l]`` the ``s`` of
    :func:`input_sensitivity` ([C_in_l]; ``None`` allowed where not prunable), ``positions[l]`` P_l (output
    positions of one image, 1 for linear), ``kernel_sizes[l]`` k_l = kh kw (1 for linear), ``in_channels[l]``
    and ``out_channels[l]`` the current widths. ``producers[l]``: the layer whose filters are layer l's input
    channels, or None (default: the chain l-1, None for the first layer); two prunable layers may not name
    the same producer. ``prunable[l]``: False keeps layer l's input whole (n_l = C_in_l; its weights still
    count in the size, with its out_l reduced if its consumer is pruned); default all True. ``budget``:
    the target of the remaining conv/linear weights, or of ``size_of(allocation)`` when given (any amount
    that falls as eps grows, e.g. the pruned network's params: the official code reaches those by adjusting the
    weight budget in an outer search; solving eps for them directly gives the same allocation). ``side``: which
    side of the step at the budget: ``nearest`` (default, as the official solver), ``under`` (size <= budget) or
    ``over`` (size >= budget). A budget outside the reachable range gives the nearer end and ``in_range=False``.
    """
    if side not in ("nearest", "under", "over"):
        raise ValueError(f"side must be nearest, under or over, not {side!r}")
    size = size_of or (lambda allocation: allocation.size)
    problem = _Problem(sensitivities, positions, kernel_sizes, in_channels, out_channels, producers, prunable, delta, c)
    lo, hi = problem.at(EPS_MIN), problem.at(EPS_MAX)  # sizes: size(lo) >= size(hi)
    size_lo, size_hi = size(lo), size(hi)
    if budget >= size_lo:
        return problem.at(EPS_MIN, in_range=budget == size_lo)
    if budget <= size_hi:
        return problem.at(EPS_MAX, in_range=budget == size_hi)
    x_lo, x_hi = math.log(EPS_MIN), math.log(EPS_MAX)  # invariant: size(lo) > budget > size(hi)
    while True:  # bisection in log(eps) until eps itself cannot be split (about 60 steps)
        x_mid = 0.5 * (x_lo + x_hi)
        eps_mid = math.exp(x_mid)
        if eps_mid in (lo.eps, hi.eps):
            break
        mid = problem.at(eps_mid)
        size_mid = size(mid)
        if size_mid == budget:
            return mid
        if size_mid > budget:
            x_lo, lo, size_lo = x_mid, mid, size_mid
        else:
            x_hi, hi, size_hi = x_mid, mid, size_mid
    if side == "under":
        return hi
    if side == "over":
        return lo
    return lo if size_lo - budget < budget - size_hi else hi


# ---------------------------------------------------------------------------------------- channel choice


def keep_top(s: torch.Tensor, n: int) -> torch.Tensor:
    """Deterministic PFP: a bool mask of the ``n`` channels with the largest ``s`` (ties: lower index first);
    the kept weights stay as they are."""
    n = max(0, min(int(n), s.numel()))
    order = torch.sort(s.flatten(), descending=True, stable=True).indices[:n]
    mask = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
    mask[order] = True
    return mask


def probabilities(s: torch.Tensor) -> torch.Tensor:
    """The sampling distribution ``p_j = s_j / sum s`` (float64), with ``p_j <= eps_float32`` set to 0 (all 0
    when ``sum s <= eps_float32``)."""
    s = s.detach().flatten().double()
    total = float(s.sum())
    if total <= Z_EPS:
        return torch.zeros_like(s)
    p = s / total
    return torch.where(p > Z_EPS, p, torch.zeros_like(p))


def draws_for_distinct(p: torch.Tensor, n: int) -> int:
    """m', the number of multinomial draws from ``p`` for ``n`` distinct channels: the smallest m with
    ``ceil(expected_distinct(p, m)) >= min(n, nnz - 1)``, nnz the channels with p > 0. ``n`` of 0 or 1
    (or a single channel) gives ``n``; nnz of 0 or 1 gives nnz."""
    p = torch.as_tensor(p, dtype=torch.float64).flatten()
    n = int(n)
    if p.numel() == 1 and float(p[0]) > 0:
        return n
    if n in (0, 1):
        return n
    nnz = int((p > 0).sum())
    if nnz <= 1:
        return nnz
    target = min(n, nnz - 1)

    def enough(m: int) -> bool:
        return float(_round_up(expected_distinct(p, float(m)))) >= target

    hi = 1
    while not enough(hi):
        hi *= 2
        if hi > 2**62:
            raise RuntimeError("no number of draws reaches the distinct count")
    lo = hi // 2  # enough(lo) is False (or lo = 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _sample(p: torch.Tensor, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and scale ``count_j / (m' p_j)`` of m' = draws_for_distinct(p, n) draws from p (none if p = 0)."""
    draws = draws_for_distinct(p, n) if bool((p > 0).any()) else 0
    counts = torch.zeros_like(p)
    chunk = 2**20
    for start in range(0, draws, chunk):
        idx = torch.multinomial(p, min(chunk, draws - start), replacement=True, generator=generator)
        counts += torch.bincount(idx, minlength=p.numel()).to(counts.dtype)
    scale = torch.where(p > 0, counts / (max(draws, 1) * p.clamp(min=Z_EPS)), torch.zeros_like(p))
    return counts > 0, scale


def keep_sampled(
    s: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized PFP: ``(mask, scale)`` for the input channels of one layer.

    m' = :func:`draws_for_distinct` (p, n) draws from Multinomial(p), ``p =`` :func:`probabilities` (s); channel
    j is kept if drawn and its weights ``W[:, j]`` are to be multiplied by ``scale[j] = count_j / (m' p_j)``
    (0 where not kept). Every channel with p > 0 then contributes its expected share: the reweighted layer's
    output is an unbiased estimate of the original (exactly so where no p fell to 0 under the float32 eps).
    As in the official code, ``n >= nnz`` still samples, for ``nnz - 1`` expected distinct channels: a layer
    allocated all its channels loses some at random. ``generator``: a ``torch.Generator`` on ``s``'s device
    (None: torch's global one). All-zero sensitivities fall back to :func:`keep_top` with scale 1.
    """
    p = probabilities(s)
    if not bool((p > 0).any()):
        mask = keep_top(s, n)
        return mask, mask.double()
    return _sample(p, n, generator)


def keep_top_sampled(
    s: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partially derandomized PFP (``PFPNetTop``): ``(mask, scale)``.

    With ``p = s / sum s`` and m' = :func:`draws_for_distinct` (p, n), the k = min(n, #{p_j >= 1 / m'})
    channels of largest s are kept for sure (scale 1; k = n when n <= 1); the other n - k are drawn by
    :func:`keep_sampled`'s rule from the remaining channels, their p renormalised, and reweighted.
    """
    s = s.detach().flatten().double()
    n = int(n)
    total = float(s.sum())
    if n <= 1:
        k = n
    else:
        p_all = s / total if total > 0 else torch.zeros_like(s)
        draws = draws_for_distinct(p_all, n)
        k = min(n, int((p_all >= 1.0 / draws).sum())) if draws > 0 else 0
    top = keep_top(s, k)
    scale = top.double()
    if n - k > 0:
        p_rest = probabilities(torch.where(top, torch.zeros_like(s), s))
        if bool((p_rest > 0).any()):
            _, scale_rest = _sample(p_rest, n - k, generator)
            scale = scale + scale_rest
    return scale > 0, scale


# ------------------------------------------------------------------------------------------- the stage


@dataclass
class Layer:
    """A conv or linear layer as PFP sees it: ``group``, the channel group its input channels are (their
    producer loses the filters), or None where its input is not one (the network's input, the residual
    stream, a head's hidden layer): then the layer gathers its kept inputs itself."""

    name: str
    module: nn.Module
    group: int | None
    prunable: bool
    producer: int | None = None  # index of the layer producing the group


def pfp_layers(model, input_shape, protect: set[int]) -> tuple[list[Layer], dict[str, int]]:
    """The model's dense conv and linear layers in forward order, and their output positions per image."""
    groups = model.channel_groups()
    consumer_of = {c: g for g, group in enumerate(groups) for c in group.consumers}
    modules = dict(model.named_modules())
    pixels = layer_pixels(model, input_shape)
    layers = [
        Layer(name, modules[name], consumer_of.get(name), consumer_of.get(name) not in protect)
        for name in pixels
        if isinstance(modules[name], nn.Linear) or (isinstance(modules[name], nn.Conv2d) and modules[name].groups == 1)
    ]
    index = {layer.name: i for i, layer in enumerate(layers)}
    for layer in layers:
        if layer.group is not None:
            layer.producer = index.get(groups[layer.group].conv)
    return layers, pixels


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the layer's weight multiplies: its input, or the channels it gathers of it."""
    return x.index_select(1, module.inputs) if isinstance(module, (GatherConv, GatherLinear)) else x


def sensitivities(model, layers: list[Layer], images: torch.Tensor, batch_size: int) -> list[torch.Tensor | None]:
    """``input_sensitivity`` of every prunable layer over ``images`` (eval mode, in batches; combined by max)."""
    found: list[torch.Tensor | None] = [None] * len(layers)

    def hook(module, inputs, i):
        s = input_sensitivity(module, layer_inputs(module, inputs[0]))
        found[i] = s if found[i] is None else torch.maximum(found[i], s)

    handles = [
        layer.module.register_forward_pre_hook(lambda m, inputs, i=i: hook(m, inputs, i))
        for i, layer in enumerate(layers)
        if layer.prunable
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk in images.split(batch_size):
                model(chunk)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [s.cpu() if s is not None else None for s in found]


@dataclass
class Plan:
    """One pruning of the model: keep masks per channel group, gathers and reweighting per layer."""

    allocation: Allocation
    keep: list[torch.Tensor]
    gathers: dict[str, list[int]]
    scales: dict[str, torch.Tensor]


def layer_problem(layers: list[Layer], sens, pixels: dict[str, int]) -> dict:
    """The arguments of :func:`allocate` / :func:`allocation_at` for these layers (current widths)."""
    return dict(
        sensitivities=sens,
        positions=[pixels[layer.name] for layer in layers],
        kernel_sizes=[math.prod(layer.module.weight.shape[2:]) for layer in layers],
        in_channels=[layer.module.weight.shape[1] for layer in layers],
        out_channels=[layer.module.weight.shape[0] for layer in layers],
        producers=[layer.producer for layer in layers],
        prunable=[layer.prunable for layer in layers],
    )


def make_plan(model, layers, sens, allocation: Allocation, variant: str, min_channels: int, seed: int) -> Plan:
    """Choose every layer's input channels for the allocation's counts n_l (``variant``: deterministic,
    randomized or top; randomized draws are seeded by ``seed``, the same for every allocation tried)."""
    generator = torch.Generator().manual_seed(seed)
    keep = [torch.ones(w, dtype=torch.bool) for w in model.widths]
    gathers, scales = {}, {}
    for layer, s, n in zip(layers, sens, allocation.kept):
        if not layer.prunable:
            continue
        n = max(n, min(min_channels, len(s))) if layer.group is not None else n
        if variant == "deterministic":
            mask = keep_top(s, n)
        else:
            mask, scales[layer.name] = (keep_sampled if variant == "randomized" else keep_top_sampled)(s, n, generator)
        if layer.group is not None:
            keep[layer.group] = mask
        elif not bool(mask.all()):
            gathers[layer.name] = torch.nonzero(mask).flatten().tolist()
    return Plan(allocation, keep, gathers, scales)


class Amount:
    """Params or MACs of the model pruned to some group widths with some layers gathering fewer inputs, counted
    from the traced structure (``pruning.Structure``) without building it."""

    def __init__(self, model, input_shape, layers: list[Layer], pixels: dict[str, int], target: str):
        self.structure, self.pixels, self.macs = structure(model, input_shape), pixels, target == "macs"
        self.layers = {layer.name: layer.module for layer in layers}
        self.produces = {g.conv: i for i, g in enumerate(model.channel_groups())}

    def __call__(self, widths: list[int], gathers: dict[str, list[int]]) -> float:
        params, macs = self.structure.count(widths)
        for name, inputs in gathers.items():
            weight = self.layers[name].weight
            g = self.produces.get(name)
            removed = (weight.shape[1] - len(inputs)) * (widths[g] if g is not None else weight.shape[0])
            removed *= math.prod(weight.shape[2:])
            params, macs = params - removed, macs - removed * self.pixels[name]
        return macs if self.macs else params


def apply_gathers(pruned, gathers: dict[str, list[int]]):
    if gathers:
        convert(pruned, "gather", gathers)
    return pruned


@STAGES.register("pfp")
class ProvableFilterPruning(Prune):
    """PFP: sensitivities on a small image set, one global eps allocating the kept input channels of every layer
    to meet ``prune.ratio`` of ``prune.target`` (params or macs), top channels (or sampled and reweighted)."""

    reads = ("prune",)
    shared_groups = False  # its sensitivities are per layer's input channels
    options = (
        Choice(
            "variant",
            "deterministic",
            ("deterministic", "randomized", "top"),
            "deterministic: the n_l most sensitive channels (the paper's CIFAR runs) | randomized: sampled and "
            "reweighted | top: the surest kept, the rest sampled",
        ),
        Int(
            "sample_size",
            None,
            "images of S; null: ceil(3 ln(8 eta_max eta / 1e-16)) capped at half of 10% of the training set",
            lo=1,
            nullable=True,
        ),
        Int("batch_size", 16, "images of S per forward", lo=1),
    )

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        p = cfg["prune"]
        if p["target"] not in ("params", "macs"):
            raise UserError("prune.target", "PFP allocates weights: the target must be params or macs")
        if p["layer_ratios"]:
            raise UserError("prune.layer_ratios", "PFP allocates every layer's share itself; use prune.ratio")
        if p["ratio"] is None:
            raise UserError("prune.ratio", "PFP needs a ratio in (0, 1) of the target to remove")
        check_steps(cfg)

    def prepare(self, ctx, model) -> None:
        check_selection(ctx, model)
        for group in model.channel_groups():
            if len(group.consumers) > 1:
                raise UserError(
                    "schedule.stages", f"pfp needs every channel group to feed one layer; {group.name} feeds several"
                )

    def select(self, model, ctx, ratio):
        cfg, p, st = ctx.cfg, ctx.cfg.prune, ctx.cfg.schedule[self.name]
        protect = matching([g.name for g in model.channel_groups()], p.skip)
        if p.protect_last:
            protect |= model.last_groups()
        layers, pixels = pfp_layers(model, ctx.input_shape, protect)
        probe = torch.zeros(1, *ctx.input_shape, device=next(model.parameters()).device)
        size = st.sample_size or sample_size(output_units(model, probe), sample_cap(len(ctx.data.train) // 10))
        images = ctx.sample(size).x
        sens = sensitivities(model, layers, images, st.batch_size)
        amount = Amount(model, ctx.input_shape, layers, pixels, p.target)
        seed = derived(cfg.seed, self.name)

        def plan_of(allocation: Allocation) -> Plan:
            return make_plan(model, layers, sens, allocation, st.variant, p.min_channels, seed)

        def amount_of(allocation: Allocation) -> float:
            plan = plan_of(allocation)
            return amount([int(k.sum()) for k in plan.keep], plan.gathers)

        target = (1 - ratio) * amount(model.widths, {})
        plan = plan_of(allocate(**layer_problem(layers, sens, pixels), budget=target, size_of=amount_of))
        self._plan = plan
        scores = [torch.full((w,), float("nan")) for w in model.widths]
        for layer, s in zip(layers, sens):
            if layer.group is not None and s is not None:
                scores[layer.group] = s.float()
        stats = {"pfp_variant": st.variant, "pfp_images": len(images), "pfp_eps": plan.allocation.eps}
        return plan.keep, scores, stats

    def compensate(self, model, keep, ctx) -> tuple:
        if not self._plan.scales:
            return model, {}
        model = copy.deepcopy(model)  # the stage's input stays as it was
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, scale in self._plan.scales.items():
                weight = modules[name].weight
                weight.mul_(scale.to(weight).view(1, -1, *([1] * (weight.dim() - 2))))
        return model, {}

    def reshape(self, pruned):
        return apply_gathers(pruned, self._plan.gathers)
