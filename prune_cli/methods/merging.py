"""Neuron Merging (Kim et al., NeurIPS 2020; docs/methods.md "Neuron Merging"): data-free compensation of pruning.

The registered stage ``merge`` prunes like ``prune`` (any criterion, ``prune.*``) and, before the surgery, merges
every removed channel p of a group whose channels feed a conv or linear layer into the kept channel k* it most
resembles: the consumer's kept input weights become ``W[:, k] + sum_{p -> k} z_p W[:, p]`` at every kernel tap.
That is exact when p's activation is ``z_p`` times k's with ``z_p > 0``, since ReLU(z u) = z ReLU(u).

Matching, for a removed p and each kept k (flattened producer filters): the cosine distance ``1 - cos(W_p, W_k)``
and, with a BatchNorm after the producer, a bias term min-max normalised over the candidates; the score is
``lam * d_cos + (1 - lam) * d_bias``, k* its argmin, and p is merged only if ``cos(W_p, W_k*) >= threshold``.
``bn_form`` chooses the BatchNorm relation (s = ||W_p|| / ||W_k||):

- ``official`` (the authors' code): ``z = s (gamma_k / gamma_p) (var_p / var_k)`` and
  ``d_bias = |(gamma_k / var_k) (s (mu_p - var_p beta_p / gamma_p) - mu_k) + beta_k| / z`` (var: running_var);
- ``exact``: ``BN_p = z BN_k + c`` when ``W_p = s W_k``, with ``z = s gamma_p sigma_k / (gamma_k sigma_p)``,
  ``c = beta_p - z beta_k + gamma_p (s mu_k - mu_p) / sigma_p``, ``sigma = sqrt(running_var + eps)``, and
  ``d_bias = |c| / z``; candidates with ``z <= 0`` cannot merge exactly and are left out.

Without a BatchNorm the match is the largest cosine and ``z = s``. Groups without consumers (a residual branch's
outputs added into the stream) are pruned plainly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.core.options import Choice, Float
from prune_cli.stages.base import STAGES
from prune_cli.stages.prune import Prune

BN_FORMS = ("official", "exact")


def merge_matrix(
    weight: torch.Tensor,
    kept: torch.Tensor,
    bn: nn.Module | None,
    lam: float,
    threshold: float,
    bn_form: str,
) -> torch.Tensor:
    """Z (float64, channels x kept): ``Z[kept[i], i] = 1``; a removed channel p merged into kept i has
    ``Z[p, i] = z_p``; an unmatched removed channel has a zero row."""
    w = weight.detach().flatten(1).double().cpu()
    kept = kept.cpu()
    n = len(w)
    z = torch.zeros(n, len(kept), dtype=torch.float64)
    z[kept, torch.arange(len(kept))] = 1.0
    removed = torch.ones(n, dtype=torch.bool)
    removed[kept] = False
    removed = torch.nonzero(removed).flatten()
    if len(removed) == 0 or len(kept) == 0:
        return z
    norm = torch.linalg.vector_norm(w, dim=1)
    cos = (w[removed] @ w[kept].T) / (norm[removed, None] * norm[None, kept]).clamp_min(1e-300)
    s = norm[removed, None] / norm[None, kept].clamp_min(1e-300)
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        scale, bias = _bn_terms(bn, removed, kept, s, bn_form)
        bias = bias.masked_fill(~torch.isfinite(bias), float("inf"))
        finite = torch.isfinite(bias)
        lo = bias.masked_fill(~finite, float("inf")).amin(1, keepdim=True)
        hi = bias.masked_fill(~finite, float("-inf")).amax(1, keepdim=True)
        spread = hi - lo
        normalised = torch.where(spread > 0, (bias - lo) / spread.clamp_min(1e-300), torch.zeros_like(bias))
        score = (lam * (1 - cos) + (1 - lam) * normalised).masked_fill(~finite, float("inf"))
        best = score.argmin(1)
        usable = finite.any(1)
    else:
        scale, best, usable = s, cos.argmax(1), torch.ones(len(removed), dtype=torch.bool)
    rows = torch.arange(len(removed))
    merge = usable & (cos[rows, best] >= threshold)
    z[removed[merge], best[merge]] = scale[rows, best][merge]
    return z


def _bn_terms(bn, removed, kept, s, bn_form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, d_bias) of every (removed, kept) pair from the BatchNorm after the producer, in ``bn_form``."""
    gamma, beta = bn.weight.detach().double().cpu(), bn.bias.detach().double().cpu()
    mu, var = bn.running_mean.double().cpu(), bn.running_var.double().cpu()
    gp, bp, mp = gamma[removed, None], beta[removed, None], mu[removed, None]
    gk, bk, mk = gamma[None, kept], beta[None, kept], mu[None, kept]
    if bn_form == "official":
        vp, vk = var[removed, None], var[None, kept]
        z = s * (gk / gp) * (vp / vk)
        u = mp - vp * bp / gp
        return z, ((gk / vk) * (s * u - mk) + bk).abs() / z
    sigma = torch.sqrt(var + bn.eps)
    sp, sk = sigma[removed, None], sigma[None, kept]
    z = s * gp * sk / (gk * sp)
    c = bp - z * bk + gp * (s * mk - mp) / sp
    return z, torch.where(z > 0, c.abs() / z, torch.full_like(z, float("inf")))


@torch.no_grad()
def merge_removed(model, keep: list[torch.Tensor], lam: float, threshold: float, bn_form: str) -> int:
    """Fold every removed channel into its match's consumer weights, in place (the removed weights stay, for the
    surgery to drop); returns how many removed channels were merged."""
    modules = dict(model.named_modules())
    merged = 0
    for group, k in zip(model.channel_groups(), keep):
        k = k.to(torch.bool).cpu()
        if k.all() or not group.consumers:
            continue
        kept = torch.nonzero(k).flatten()
        z = merge_matrix(modules[group.conv].weight, kept, modules.get(group.bn), lam, threshold, bn_form)
        merged += int((z[~k] != 0).any(1).sum())
        for name in group.consumers:
            weight = modules[name].weight
            taps = weight.view(weight.shape[0], len(k), -1)  # conv: [out, C, kh*kw]; linear: [out, C, features/C]
            taps[:, kept] = torch.einsum("pk,opt->okt", z.to(weight), taps)
    return merged


@STAGES.register("merge")
class Merge(Prune):
    """Prune with the criterion and ``prune.*``, merging the removed channels into the kept ones first."""

    shared_groups = False  # a removed channel is merged into its group's consumers, one producer's

    options = (
        Float("lam", 0.85, "weight of the cosine distance against the BN bias term (official CIFAR 0.85)", lo=0, hi=1),
        Float("threshold", 0.1, "merge only if the cosine similarity reaches this (official CIFAR 0.1)", lo=-1, hi=1),
        Choice("bn_form", "official", BN_FORMS, "official: the authors' BN terms | exact: the exact BN relation"),
    )

    def prepare(self, ctx, model) -> None:
        other = getattr(model, "activations", {"ReLU"}) - {"ReLU"}  # a model that does not say has only ReLU
        if other:  # merging rests on ReLU(z u) = z ReLU(u), z > 0
            raise UserError(
                "schedule.stages",
                f"neuron merging needs ReLU activations; {model.arch['name']} also uses {', '.join(sorted(other))}",
            )
        super().prepare(ctx, model)

    def compensate(self, model, keep, ctx) -> tuple:
        st = ctx.cfg.schedule[self.name]
        model = copy.deepcopy(model)  # the stage's input stays as it was
        self.merged = getattr(self, "merged", 0) + merge_removed(model, keep, st.lam, st.threshold, st.bn_form)
        return model, {"merge_bn_form": st.bn_form, "merged_channels": self.merged}
