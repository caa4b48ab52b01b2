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

A group several layers hold (``prune.residual=true``: a residual stream) is matched on all its producers' filters
side by side (cosine and s of the concatenated rows, as the criteria's sum rule), z and the bias term are the means
of every BatchNorm's, and the compensation applies in every consumer at the channels' positions: exact when every
producer's filter p is the same s times its filter k and every BatchNorm gives the same z with c = 0, since the
stream's additions then keep p = z k everywhere. Groups a grouped conv produces or reads (depthwise chains) are
pruned plainly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.core.options import Choice, Float
from prune_cli.importance.criteria import channel_vectors
from prune_cli.stages.base import STAGES
from prune_cli.stages.prune import Prune
from prune_cli.structure.groups import ChannelGroup, Slot

BN_FORMS = ("official", "exact")


@dataclass(frozen=True)
class NormEntries:
    """One BatchNorm's entries of a group's channels (float64, CPU, channel i at index i)."""

    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    eps: float

    @classmethod
    def of(cls, bn: nn.Module, index: torch.Tensor | None = None) -> NormEntries:
        """The entries of ``bn`` at ``index`` (the channels' positions; None: all, in order)."""
        tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        picked = [t.detach().double().cpu() for t in tensors]
        if index is not None:
            picked = [t[index] for t in picked]
        return cls(*picked, bn.eps)


def merge_matrix(
    weight: torch.Tensor,
    kept: torch.Tensor,
    bn: nn.Module | list[NormEntries] | None,
    lam: float,
    threshold: float,
    bn_form: str,
) -> torch.Tensor:
    """Z (float64, channels x kept): ``Z[kept[i], i] = 1``; a removed channel p merged into kept i has
    ``Z[p, i] = z_p``; an unmatched removed channel has a zero row. ``weight``: the producer filters (row c: channel
    c's, all producers' side by side); ``bn``: the BatchNorm after the producer, or the entries of every BatchNorm
    holding the channels (z and the bias term: their means over them), or None."""
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
    norms = [NormEntries.of(bn)] if isinstance(bn, nn.modules.batchnorm._BatchNorm) else bn
    norms = norms if isinstance(norms, list) else None  # a layer without BatchNorm named as the norm: none
    if norms:
        scale, bias = _mean_bn_terms(norms, removed, kept, s, bn_form)
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


def _mean_bn_terms(norms: list[NormEntries], removed, kept, s, bn_form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, d_bias) of every (removed, kept) pair: each BatchNorm's, averaged over the BatchNorms holding the channels
    (in the exact case they all give the same z and c = 0; a candidate infinite in one is out)."""
    if len(norms) == 1:
        return _bn_terms(norms[0], removed, kept, s, bn_form)
    terms = [_bn_terms(entries, removed, kept, s, bn_form) for entries in norms]
    return torch.stack([t[0] for t in terms]).mean(0), torch.stack([t[1] for t in terms]).mean(0)


def _bn_terms(bn: NormEntries, removed, kept, s, bn_form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, d_bias) of every (removed, kept) pair from one BatchNorm's entries, in ``bn_form``."""
    gamma, beta, mu, var = bn.gamma, bn.beta, bn.mean, bn.var
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


def mergeable(group: ChannelGroup, modules: dict[str, nn.Module]) -> bool:
    """Whether the group's removed channels can be merged: it has consumers (a residual branch's outputs added into
    the stream have none), and no grouped conv produces or reads its channels (a depthwise chain filters each
    channel on its own, so no kept channel's activation is a multiple of a removed one's through it)."""
    consumers = group.role("consumer")
    grouped = any(getattr(modules[s.module], "groups", 1) != 1 for s in group.slots if s.role != "norm")
    return bool(consumers) and not grouped


def group_norms(group: ChannelGroup, modules: dict[str, nn.Module]) -> list[NormEntries] | None:
    """The entries of every BatchNorm holding the group's channels (a channel at several positions of one: one
    entry per position), or None for a group without BatchNorm."""
    norms = []
    for slot in group.role("norm"):
        bn = modules[slot.module]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            return None
        index = slot.index()
        norms += [NormEntries.of(bn)] if index is None else [NormEntries.of(bn, column) for column in index.T]
    return norms


def compensate_consumer(weight: torch.Tensor, slot: Slot, z: torch.Tensor, kept: torch.Tensor, width: int) -> None:
    """In place: every kept channel's input weights in this consumer become ``sum_p Z[p, k] W[:, p]`` (the removed
    channels merged into it), at the channel's positions and every kernel tap or feature."""
    z, kept = z.to(weight), kept.to(weight.device)
    index = slot.index()
    if index is None:  # conv: [out, C, kh*kw]; linear: [out, C, features/C]
        taps = weight.view(weight.shape[0], width, -1)
        taps[:, kept] = torch.einsum("pk,opt->okt", z, taps)
        return
    taps = weight.view(weight.shape[0], weight.shape[1], -1)
    index = index.to(weight.device)
    taps[:, index[kept]] = torch.einsum("pk,opqt->okqt", z, taps[:, index])


@torch.no_grad()
def merge_removed(model, keep: list[torch.Tensor], lam: float, threshold: float, bn_form: str) -> int:
    """Fold every removed channel into its match's consumer weights, in place (the removed weights stay, for the
    surgery to drop); returns how many removed channels were merged."""
    modules = dict(model.named_modules())
    merged = 0
    for group, k in zip(model.channel_groups(), keep):
        k = k.to(torch.bool).cpu()
        if k.all() or not mergeable(group, modules):
            continue
        kept = torch.nonzero(k).flatten()
        rows = channel_vectors(model, group, "filter", modules)  # every producer's filter of a channel, side by side
        z = merge_matrix(rows, kept, group_norms(group, modules), lam, threshold, bn_form)
        merged += int((z[~k] != 0).any(1).sum())
        for slot in group.role("consumer"):
            compensate_consumer(modules[slot.module].weight, slot, z, kept, len(k))
    return merged


@STAGES.register("merge")
class Merge(Prune):
    """Prune with the criterion and ``prune.*``, merging the removed channels into the kept ones first."""

    shared_groups = True  # a channel several layers hold: matched on all its producers, merged in every consumer

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
