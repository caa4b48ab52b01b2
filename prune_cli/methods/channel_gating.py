"""Channel gating (Hua, Zhou, De Sa, Zhang and Suh, NeurIPS 2019; docs/methods.md "Channel gating"): a conv
followed by BN + ReLU computes, per output element, either a cheap partial sum or the full sum, decided from the
partial sum itself. Dynamic and per position: no weight is removed; the saving is the MACs skipped on average.

- ``GatedConv`` (layer kind ``gated``, recorded in ``model.arch`` so ``build_model`` rebuilds it): the base path
  ``Yp = conv(x, W * M)`` with M the first ``C_in / p`` input channels (or, with ``group``, a block-diagonal mask:
  output group g reads input group g of p); the decision ``d = [BN(Yp) > Delta_c]`` with a BatchNorm without
  affine parameters and one learned threshold ``Delta_c`` per output channel; the output
  ``d * conv(x, W) + (1 - d) * Yp``, computed as ``Yp + d * conv(x, W * (1 - M))``. In training the step is taken
  of ``sigmoid(alpha * (BN(Yp) - Delta)) - 0.5`` with a straight-through gradient (1 where the gate is on, 0 where
  it is off with ``sparse_bp``; 1 everywhere without).
- stage ``cg``: converts the model's gated convs (``variant: original``: the conv of every channel group, i.e. conv1
  of every ResNet block; ``post_activated``: conv2 as well), trains it with
  ``CE + lam * sum (Delta - T)^2`` and SGD whose weight decay spares the thresholds and every 1-D parameter, and
  writes its row with ``dynamic_macs``, the test-set mean of the MACs each image needs
  (``measure.mean_dynamic_macs``), next to the static ``macs``.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from omegaconf import OmegaConf
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool, Choice, Float, Int, with_default
from prune_cli.data import batches
from prune_cli.importance.regularizers import Regularizer
from prune_cli.models.layers import convert, register_kind
from prune_cli.stages.base import STAGES
from prune_cli.stages.train import OPTIONS as TRAIN_OPTIONS
from prune_cli.stages.train import TrainStage
from prune_cli.structure.counting import mean_dynamic_macs

KIND = "gated"  # the arch key: {conv name: {"p", "group", "alpha", "sparse_bp", "init"}}


def base_mask(out_channels: int, in_channels: int, p: int, group: bool) -> torch.Tensor:
    """M [C_out, C_in, 1, 1]: 1 where the base path reads. Without ``group`` the first ``C_in / p`` inputs of every
    filter; with ``group`` output block g (``C_out / p`` filters) reads input block g (``C_in / p`` channels)."""
    mask = torch.zeros(out_channels, in_channels, 1, 1)
    cin = in_channels // p
    if not group:
        mask[:, :cin] = 1.0
        return mask
    cout = out_channels // p
    for g in range(p):
        mask[g * cout : (g + 1) * cout, g * cin : (g + 1) * cin] = 1.0
    return mask


class GateStep(torch.autograd.Function):
    """``[z > 0]`` forward; straight-through backward: the gradient passes unchanged, only where ``z >= 0`` when
    ``sparse`` (the official ``--sparse_bp``, used by both of its scripts)."""

    @staticmethod
    def forward(ctx, z, sparse: bool):
        ctx.sparse = sparse
        if sparse:
            ctx.save_for_backward(z)
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.sparse:
            (z,) = ctx.saved_tensors
            grad = grad * (z >= 0).to(grad.dtype)
        return grad, None


class GatedConv(nn.Conv2d):
    """A conv computing the full sum only where its gate is on (see the module docstring).

    ``threshold`` (Delta, one per output channel) is a parameter; ``norm`` is the BatchNorm without affine
    parameters on the base path; the mask is a buffer rebuilt from ``p`` and ``group`` (not saved).
    ``per_image_macs``: set to a list by ``measure.mean_dynamic_macs``; each forward then appends the MACs every
    image needed: ``|M| x k x k x H_out x W_out`` for the base path plus, for every output element whose gate is
    on, its filter's remaining ``(C_in - |M_o|) x k x k``.
    """

    per_image_macs = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = False,
        *,
        p: int,
        group: bool,
        alpha: float,
        sparse_bp: bool,
        init: float = 0.0,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.p, self.group, self.alpha, self.sparse_bp = p, group, alpha, sparse_bp
        self.norm = nn.BatchNorm2d(out_channels, affine=False)
        self.threshold = nn.Parameter(torch.full((out_channels,), float(init)))
        self.register_buffer("base_mask", base_mask(out_channels, in_channels, p, group), persistent=False)

    def decisions(self, base: torch.Tensor) -> torch.Tensor:
        """d (0/1, same shape as ``base``) from the base path's output."""
        z = torch.sigmoid(self.alpha * (self.norm(base) - self.threshold.view(1, -1, 1, 1))) - 0.5
        if not torch.is_grad_enabled():  # the same step without the autograd function (TorchScript can trace it)
            return (z > 0).to(z.dtype)
        return GateStep.apply(z, self.sparse_bp)

    def forward(self, x):
        base = self._conv_forward(x, self.weight * self.base_mask, self.bias)
        rest = self._conv_forward(x, self.weight * (1 - self.base_mask), None)
        d = self.decisions(base)
        if self.per_image_macs is not None:
            self.per_image_macs.append(self.macs_needed(d))
        return base + d * rest

    @torch.no_grad()
    def macs_needed(self, d: torch.Tensor) -> torch.Tensor:
        """[N] MACs per image (int64) for decisions ``d`` [N, C_out, H_out, W_out]."""
        taps = self.kernel_size[0] * self.kernel_size[1]
        kept = self.base_mask.flatten(1).sum(1).round().long()  # [C_out]: |M_o|
        base = int(kept.sum()) * taps * d.shape[2] * d.shape[3]
        open_elements = d.detach().sum((2, 3)).round().long()  # [N, C_out]
        return base + (open_elements * (self.in_channels - kept) * taps).sum(1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}, group={self.group}"


def as_gated(conv: nn.Conv2d, entry: dict) -> GatedConv:
    """A ``GatedConv`` with ``conv``'s weights and the settings ``entry`` (the arch's record)."""
    new = GatedConv(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
        **entry,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


register_kind(KIND, as_gated)


def gated_convs(model, variant: str) -> list[str]:
    """The convs channel gating goes on, in module order: ``original``: the conv of every channel group whose
    channels feed other layers (through BN + ReLU: conv1 of every ResNet block, every VGG conv); ``post_activated``:
    also their consumer convs (conv2 of every ResNet block). Never the first conv, which reads the image."""
    modules = dict(model.named_modules())
    groups = [g for g in model.channel_groups() if g.consumers]
    names = {g.conv for g in groups}
    if variant == "post_activated":
        names |= {c for g in groups for c in g.consumers}
    first = next(n for n, m in modules.items() if isinstance(m, nn.Conv2d))
    return [n for n, m in modules.items() if n in names and n != first and type(m) is nn.Conv2d]


def gate_entry(st) -> dict:
    return {"p": st.p, "group": st.group, "alpha": st.alpha, "sparse_bp": st.sparse_bp, "init": st.init}


class ThresholdLoss(Regularizer):
    """``lam * sum over gated convs of sum_c (Delta_c - T)^2`` added to the loss, and the official weight decay:
    ``grad += weight_decay * W`` before each step for every parameter with more than one dimension (conv and
    linear weights), so thresholds, BN parameters and biases are not decayed. The optimizer runs without decay."""

    edits_gradients = True

    def __init__(self, model: nn.Module, lam: float, target: float, weight_decay: float):
        super().__init__(model)
        self.lam, self.target, self.weight_decay = lam, target, weight_decay
        self.thresholds = [m.threshold for m in model.modules() if isinstance(m, GatedConv)]
        self.decayed = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]

    def penalty(self) -> torch.Tensor:
        if not self.thresholds or not self.lam:
            return self._zero
        return self.lam * (torch.cat(self.thresholds) - self.target).square().sum()

    @torch.no_grad()
    def before_step(self) -> None:
        params = [p for p in self.decayed if p.grad is not None]
        if params and self.weight_decay:
            torch._foreach_add_([p.grad for p in params], params, alpha=self.weight_decay)


# the training settings the cg stage shares with the training stages, with the official script's defaults
_TRAINING = {o.name: o for o in TRAIN_OPTIONS}
TRAINING_OPTIONS = with_default(
    (
        replace(_TRAINING["epochs"], doc="epochs of gated training (the official script: 250, from init)"),
        _TRAINING["lr"],
        replace(_TRAINING["momentum"], doc="SGD momentum"),
        _TRAINING["nesterov"],
        replace(
            _TRAINING["weight_decay"],
            doc="SGD weight decay of conv and linear weights only (not thresholds, BN, biases), as the official code",
        ),
        *(_TRAINING[n] for n in ("lr_schedule", "milestones", "step_size", "gamma", "batch_size")),
    ),
    epochs=250,
    weight_decay=1e-4,
    milestones=[0.6, 0.8],
)

OPTIONS = (
    Choice(
        "variant",
        "original",
        ("original", "post_activated"),
        "original: gate conv1 of every ResNet block (every VGG conv but the first); post_activated: conv2 as well "
        "(the block stays this tool's: ReLU after the addition)",
    ),
    Int("p", 4, "the base path reads 1/p of the input channels (official: 4 original, 2 post-activated)", lo=2),
    Bool("group", False, "block-diagonal base path: output block g of p reads input block g (official --use_group)"),
    Float(
        "target", 1.0, "T of the threshold loss lam * sum (Delta - T)^2 (official: 1.0 original, 0.6 post-activated)"
    ),
    Float("lam", 1e-4, "weight of the threshold loss (official 1e-4)", lo=0.0),
    Float("init", 0.0, "initial threshold Delta of every output channel (official 0.0)"),
    Float(
        "alpha",
        2.0,
        "training: the step is taken of sigmoid(alpha * (BN(Yp) - Delta)) - 0.5 (official 2.0)",
        lo=0.0,
        lo_open=True,
    ),
    Bool("sparse_bp", True, "the step's gradient passes only where the gate is on (official --sparse_bp); false: all"),
    *TRAINING_OPTIONS,
)


@STAGES.register("cg")
class ChannelGating(TrainStage):
    """Channel gating: gated convs trained from the model as it comes, with the target-threshold loss; its row adds
    the test-set mean of the dynamic MACs."""

    options = OPTIONS
    shared_groups = False  # it gates each channel group's one conv

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        stages = cfg["schedule"]["stages"]
        after = stages[stages.index(cls.name) + 1 :]
        if after:
            raise UserError(
                "schedule.stages",
                f"the gated network is the result: list {cls.name} last (after it: {', '.join(after)})",
            )
        super().check_config(cfg)

    def prepare(self, ctx, model):
        st = ctx.cfg.schedule[self.name]
        if any(isinstance(m, GatedConv) for m in model.modules()):
            raise UserError("init_from", "the model is already gated (a cg checkpoint); start from an ungated one")
        names = gated_convs(model, st.variant)
        if not names:
            raise UserError("schedule.cg.variant", f"{model.arch['name']} has no conv followed by BN + ReLU to gate")
        modules = dict(model.named_modules())
        for name in names:
            conv = modules[name]
            if conv.groups != 1:
                raise UserError("schedule.cg.variant", f"{name} is a grouped conv; channel gating needs plain convs")
            widths = [("input", conv.in_channels)] + ([("output", conv.out_channels)] if st.group else [])
            for what, width in widths:
                if width % st.p:
                    raise UserError(
                        "schedule.cg.p",
                        f"{name} has {width} {what} channels, not a multiple of p={st.p}"
                        + (" (group splits outputs too)" if what == "output" else ""),
                    )
        return self.transform(copy.deepcopy(model), ctx)

    def settings(self, st):
        # SGD with its own decay off: ThresholdLoss applies the decay to the conv and linear weights only
        return OmegaConf.create(
            {
                **OmegaConf.to_container(st, resolve=True),
                "optimizer": "sgd",
                "weight_decay": 0.0,
                "graft": {"variant": "none"},
            }
        )

    def transform(self, model, ctx):
        st = ctx.cfg.schedule[self.name]
        convert(model, KIND, {n: gate_entry(st) for n in gated_convs(model, st.variant)})
        return model

    def loss_terms(self, model, ctx):
        st = ctx.cfg.schedule[self.name]
        return ThresholdLoss(model, st.lam, st.target, st.weight_decay)

    def row_extras(self, model, ctx) -> dict:
        test = batches(ctx.data.test, ctx.data, ctx.cfg.trainer.eval_batch_size)
        return {"dynamic_macs": round(mean_dynamic_macs(model, ctx.input_shape, test), 1)}
