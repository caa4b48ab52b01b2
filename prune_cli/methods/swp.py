"""Stripe-wise pruning (SWP; Meng et al., NeurIPS 2020, "Pruning Filter in Filter"), docs/methods.md.

Two registered parts:

- regularizer ``swp``: every k x k conv (k > 1; not residual projections) gets a filter skeleton
  ``S[o, kh, kw]`` (``models.layers.SkeletonConv``, starting at 1). Every step, after ``backward()``:
  ``grad(S) += alpha * sign(S)``, then ``S`` and ``grad(S)`` are zeroed where ``|S| <= threshold``, and the
  BatchNorm gamma and beta (and their gradients) of filters whose whole skeleton is zero are zeroed. The
  loss itself gets no term.
- stage ``stripe``: removes the dead filters (a channel group's filters whose skeleton is all zero, with the
  consumers' input channels; a residual block whose conv has no stripe left keeps only its shortcut), then
  breaks every skeleton conv into its kept stripes ``W[o, :, i, j] * S[o, i, j]`` (``StripeConv``).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool, Float
from prune_cli.importance.regularizers import REGULARIZERS, Regularizer, l1_subgradient_
from prune_cli.models.layers import SkeletonConv, convert, fold, stripe_positions
from prune_cli.stages.base import STAGES, Stage
from prune_cli.stages.prune import finish_pruning

THRESHOLD_DOC = "delta: skeleton entries with |S| <= delta are zeroed (training) / removed (stripe stage)"


def skeleton_convs(model: nn.Module) -> list[str]:
    """The convs a skeleton goes on: every k x k conv with k > 1 except residual projections."""
    shortcuts = set(model.shortcut_convs()) if hasattr(model, "shortcut_convs") else set()
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and n not in shortcuts
    ]


@REGULARIZERS.register("swp")
class FilterSkeleton(Regularizer):
    """SWP's filter skeleton: an L1 subgradient and a hard threshold applied to ``S`` every step."""

    options = (
        Float("alpha", 1e-5, "L1 subgradient strength: grad(S) += alpha * sign(S) (official --sr)", lo=0.0),
        Float("threshold", 0.01, THRESHOLD_DOC + " (official --threshold)", lo=0.0),
        Bool("zero_dead_bn", True, "zero BN gamma and beta of filters whose whole skeleton is zero, every step"),
        Float(
            "init_gamma", None, "BN scales set to this when the stage starts (official: 0.5); null keeps", nullable=True
        ),
        Float(
            "init_linear_std",
            None,
            "linear weights drawn from N(0, std^2) when the stage starts (official: 0.01); null keeps",
            lo=0.0,
            lo_open=True,
            nullable=True,
        ),
    )
    edits_gradients = True

    def __init__(self, model: nn.Module, **hparams):
        super().__init__(model, **hparams)
        names = skeleton_convs(model)
        if not names:
            raise UserError("regularizer.name", "swp needs k x k convs (k > 1) to put filter skeletons on")
        modules = dict(model.named_modules())
        convert(model, "skeleton", [n for n in names if not isinstance(modules[n], SkeletonConv)])
        modules = dict(model.named_modules())
        self.layer_names = names
        self._convs = [modules[n] for n in names]
        groups = model.channel_groups() if hasattr(model, "channel_groups") else []
        # the BN after each group's producer conv (VGG: every conv; ResNet: bn1 of each block, as official)
        self._bns = [(modules[g.conv], modules[g.bn]) for g in groups if g.conv in names]
        self.alpha, self.threshold = self.hparams["alpha"], self.hparams["threshold"]
        self._initialise(model)

    @torch.no_grad()
    def _initialise(self, model: nn.Module) -> None:
        gamma, std = self.hparams["init_gamma"], self.hparams["init_linear_std"]
        for m in model.modules():
            if gamma is not None and isinstance(m, nn.BatchNorm2d) and m.weight is not None:
                m.weight.fill_(gamma)
            if std is not None and isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)

    @torch.no_grad()
    def before_step(self) -> None:
        l1_subgradient_([c.skeleton for c in self._convs], self.alpha, self.threshold)
        if self.hparams["zero_dead_bn"]:
            for conv, bn in self._bns:
                alive = (conv.skeleton != 0).flatten(1).any(1).to(bn.weight.dtype)
                outputs = (bn.weight, bn.bias) if bn is not conv else (conv.bias,)  # no BatchNorm: the conv's bias
                for t in (t for t in outputs if t is not None):
                    t.mul_(alive)
                    if t.grad is not None:
                        t.grad.mul_(alive)


def alive_stripes(model: nn.Module, threshold: float) -> dict[str, torch.Tensor]:
    """{conv name: bool mask[o, i, j] of the stripes whose |S| > threshold} of every skeleton conv."""
    return {n: m.skeleton.detach().abs() > threshold for n, m in model.named_modules() if isinstance(m, SkeletonConv)}


def dead_filter_keep(model, alive: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep masks (filters with a stripe left) and scores (stripes left per filter) of every channel group.

    A group one of whose consumers has no stripe at all feeds nothing: it goes whole (its block keeps only
    its shortcut), which only a removable group may; a conv left without stripes elsewhere is refused."""
    groups, removable = model.channel_groups(), model.removable_groups()
    keep, scores, emptied = [], [], set()
    for g, group in enumerate(groups):
        width = model.get_submodule(group.conv).out_channels
        mask = alive.get(group.conv)
        count = mask.flatten(1).sum(1).float().cpu() if mask is not None else torch.full((width,), float("inf"))
        k = count > 0
        if any(c in alive and not alive[c].any() for c in group.consumers) or not k.any():
            k = torch.zeros(width, dtype=torch.bool)
        if not k.any():
            if g not in removable:
                raise UserError(
                    "regularizer.alpha",
                    f"every stripe of {group.name} died in training: the network would be cut; lower the L1 "
                    "strength or the threshold",
                )
            emptied |= {group.conv, *group.consumers}
        keep.append(k)
        scores.append(count)
    for name, mask in alive.items():
        if not mask.any() and name not in emptied:
            raise UserError(
                "regularizer.alpha",
                f"every stripe of {name} died in training and it cannot be bypassed; lower the L1 strength",
            )
    return keep, scores


def break_into_stripes(model, threshold: float):
    """Replace every skeleton conv by its stripes ``|S| > threshold`` (weights ``W * S``), in place."""
    convert(model, "stripes", {n: stripe_positions(mask) for n, mask in alive_stripes(model, threshold).items()})
    return fold(model)


@STAGES.register("stripe")
class StripeStage(Stage):
    """SWP's prune: removes dead filters, then breaks the skeleton convs into stripes (no finetune officially)."""

    prunes = True
    options = (Float("threshold", 0.01, THRESHOLD_DOC, lo=0.0),)

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        stages = cfg["schedule"]["stages"]
        before = stages[: stages.index("stripe")]
        if cfg["init_from"] is None and not ("sparse_train" in before and cfg["regularizer"]["name"] == "swp"):
            raise UserError(
                "schedule.stages",
                "the stripe stage breaks filter skeletons: list sparse_train before it with regularizer=swp "
                "(or start with init_from from such a run)",
            )

    def prepare(self, ctx, model) -> None:
        trains_skeleton = "sparse_train" in ctx.cfg.schedule.stages and ctx.cfg.regularizer.name == "swp"
        if not trains_skeleton and not alive_stripes(model, 0.0):
            raise UserError("init_from", "the stripe stage needs a model with filter skeletons (regularizer=swp)")

    def run(self, model, ctx, checkpoint):
        tic = time.perf_counter()
        threshold = ctx.cfg.schedule[self.name].threshold
        alive = alive_stripes(model, threshold)
        keep, scores = dead_filter_keep(model, alive)
        total = sum(m.numel() for m in alive.values())
        extra = {"stripes_kept": float(sum(m.sum() for m in alive.values()) / total)}
        return finish_pruning(
            model,
            keep,
            scores,
            ctx,
            self.name,
            time.perf_counter() - tic,
            extra,
            reshape=lambda pruned: break_into_stripes(pruned, threshold),
        )
