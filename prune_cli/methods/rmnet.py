"""RMNet (Meng et al., 2021; docs/methods.md "RM operation"): a residual network of BasicBlocks turned into a plain
conv-BN-ReLU network computing the same function, whose every channel can then be pruned.

Two registered parts:

- stage ``rm``: the RM operation. Each block ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` becomes two
  plain layers. The first reserves the input: ``C_in`` Dirac filters (``W[c, c, 1, 1] = 1``, with the block's
  stride) next to conv1, so after the ReLU they carry ``x`` itself (``x >= 0``: it is a ReLU output). The second
  merges: conv2 on conv1's channels and the shortcut, as a centre tap, on the reserved ones. With BatchNorm kept,
  the reserved channels get a BatchNorm that is the identity (``gamma = sqrt(var + eps)``, ``beta = mean``) and the
  second layer's BatchNorm adds the folded biases of bn2 and the shortcut through its running mean; with
  ``fuse_bn`` every BatchNorm is folded into conv biases.
- regularizer ``factor_l1``: a learned factor after every channel group's BatchNorm (``ScaledBN``), trained with
  the same per-step L1 subgradient and threshold as SWP's skeleton; folded into gamma and beta before pruning,
  so a factor at 0 leaves ``gamma = beta = 0`` and ``criterion=bn_scale criterion.rule=nonzero`` removes exactly
  those channels.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool, Float, Int
from prune_cli.importance.regularizers import REGULARIZERS, Regularizer, l1_subgradient_
from prune_cli.models import build_model
from prune_cli.models.layers import ScaledBN, bn_affine, convert
from prune_cli.stages.base import STAGES, Stage


def dirac(channels: int, inputs: int, offset: int = 0, device=None) -> torch.Tensor:
    """A 3x3 weight [channels, inputs, 3, 3] passing input c to output c + offset through the centre tap."""
    w = torch.zeros(channels, inputs, 3, 3, device=device)
    w[torch.arange(inputs) + offset, torch.arange(inputs), 1, 1] = 1.0
    return w


def check_convertible(model) -> list:
    """The blocks of ``model``, or one line saying why the RM operation cannot take it."""
    layout = getattr(model, "residual_layout", lambda: False)()
    if layout is False:
        raise UserError("schedule.stages", f"the rm stage converts residual networks; {model.arch['name']} is not one")
    if layout is None:
        raise UserError("model.stem", "the rm stage needs a stem without pooling (model.stem=cifar)")
    if any(block.outputs is not None for block in layout[2]):
        raise UserError("model.prune_outputs", "the rm stage needs full residual-branch outputs (none pruned)")
    if any(not block.mid for block in layout[2]):
        raise UserError("schedule.stages", "the rm stage needs every block's residual branch (a block was removed)")
    return layout


@torch.no_grad()
def block_statistics(model, images: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Per block, over ``images`` run as in training (BatchNorm on batch statistics, its running statistics left
    as they are): mean and variance of the block input as the reserved channels see it (subsampled by the stride)
    and of its output before the final ReLU. What the official code tracks during training; in eval mode the
    plain network's outputs do not depend on them, in training they make its reserved channels pass ``x`` on."""
    _, _, blocks, _ = model.residual_layout()
    sums: list[list] = [[0.0, 0.0, 0.0, 0.0, 0] for _ in blocks]
    hooks = []

    def hook(block, inputs, _output, k):
        x = inputs[0]
        s = block.conv1.stride[0]
        inner = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        pre = inner + block.shortcut(x)
        xs = x[:, :, ::s, ::s]
        acc = sums[k]
        for i, t in enumerate((xs, pre)):
            t = t.double()
            acc[2 * i] = acc[2 * i] + t.sum((0, 2, 3))
            acc[2 * i + 1] = acc[2 * i + 1] + t.square().sum((0, 2, 3))
        acc[4] += xs[:, 0].numel()  # positions per channel (input and output share the subsampled size)

    for k, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(lambda b, i, o, k=k: hook(b, i, o, k)))
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0  # batch statistics used, running statistics kept
    model.train()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    finally:
        model.train(was_training)
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for h in hooks:
            h.remove()
    out = []
    for s_in, q_in, s_out, q_out, n in sums:
        mean_in, mean_out = s_in / n, s_out / n
        var_in, var_out = (q_in / n - mean_in.square()).clamp_min(0), (q_out / n - mean_out.square()).clamp_min(0)
        out.append(tuple(t.float() for t in (mean_in, var_in, mean_out, var_out)))
    return out


@torch.no_grad()
def rm_convert(model, fuse_bn: bool = False, statistics: list | None = None):
    """The plain network equal to ``model`` in eval mode (``statistics``: ``block_statistics``; None gives the
    reserved channels' BatchNorm mean 0 and variance 1, which changes nothing in eval mode)."""
    stem_conv, stem_bn, blocks, fc = check_convertible(model)
    device = stem_conv.weight.device
    eps = stem_bn.eps
    # per plain layer: (conv weight, BatchNorm state, (scale, shift) of that BatchNorm in eval mode)
    layers = [(stem_conv.weight, _bn_state(stem_bn), bn_affine(stem_bn))]
    strides = [1]
    for k, block in enumerate(blocks):
        stats = _statistics_of(block, statistics[k] if statistics is not None else None, device)
        layers += [_reserving_layer(block, stats, eps, device), _merging_layer(block, stats, eps, device)]
        strides += [block.conv1.stride[0], 1]
    arch = {
        "name": "plain",
        "num_classes": fc.out_features,
        "in_channels": stem_conv.in_channels,
        "widths": [w.shape[0] for w, _, _ in layers],
        "strides": strides,
        "bn": not fuse_bn,
    }
    plain = build_model(arch).to(device)
    _load_layers(plain, [_folded(w, affine) if fuse_bn else (w, bn, None) for w, bn, affine in layers], eps)
    plain.fc.load_state_dict(fc.state_dict())
    return plain.train(model.training)


def _bn_state(bn) -> dict[str, torch.Tensor]:
    """A copy of a BatchNorm's affine parameters and running statistics."""
    return {k: getattr(bn, k).detach().clone() for k in ("weight", "bias", "running_mean", "running_var")}


def _statistics_of(block, statistics: tuple | None, device) -> tuple[torch.Tensor, ...]:
    """(mean, variance) of the block's input and of its output before the ReLU: measured, or 0 and 1."""
    if statistics is not None:
        return tuple(t.to(device) for t in statistics)
    cin, cout = block.conv1.in_channels, block.bn2.num_features
    zeros, ones = torch.zeros(cin, device=device), torch.ones(cin, device=device)
    return zeros, ones, torch.zeros(cout, device=device), torch.ones(cout, device=device)


def _reserving_layer(block, stats, eps: float, device) -> tuple:
    """Dirac filters next to conv1 (the block input kept, through an identity BatchNorm), then conv1 with bn1."""
    mean_in, var_in, _, _ = stats
    cin = block.conv1.in_channels
    s1, b1 = bn_affine(block.bn1)
    weight = torch.cat([dirac(cin, cin, device=device), block.conv1.weight])
    identity = {"weight": torch.sqrt(var_in + eps), "bias": mean_in, "running_mean": mean_in, "running_var": var_in}
    bn = {key: torch.cat([identity[key], value]) for key, value in _bn_state(block.bn1).items()}
    affine = (torch.cat([torch.ones(cin, device=device), s1]), torch.cat([torch.zeros(cin, device=device), b1]))
    return weight, bn, affine


def _merging_layer(block, stats, eps: float, device) -> tuple:
    """conv2 with bn2 folded on conv1's channels and the shortcut as a centre tap on the reserved ones; their
    biases added by the BatchNorm (through its running mean)."""
    _, _, mean_out, var_out = stats
    cin, mid, cout = block.conv1.in_channels, block.mid, block.bn2.num_features
    s2, b2 = bn_affine(block.bn2)
    short_w, short_b = block.shortcut_as_conv()
    weight = torch.zeros(cout, cin + mid, 3, 3, device=device)
    weight[:, cin:] = block.conv2.weight * s2.view(-1, 1, 1, 1)
    weight[:, :cin, 1, 1] = short_w[:, :, 0, 0]
    bias = b2 + short_b
    bn = {
        "weight": torch.sqrt(var_out + eps),
        "bias": mean_out,
        "running_mean": mean_out - bias,
        "running_var": var_out,
    }
    return weight, bn, (torch.ones(cout, device=device), bias)


def _folded(weight: torch.Tensor, affine: tuple) -> tuple:
    """A layer with its BatchNorm (in eval mode) folded into the conv: (weight, no BatchNorm, bias)."""
    scale, shift = affine
    return weight * scale.view(-1, 1, 1, 1), None, shift


def _load_layers(plain, layers: list[tuple], eps: float) -> None:
    """Copy (conv weight, BatchNorm state or None, conv bias or None) into the plain network's layers in order."""
    convs = [m for m in plain.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in plain.features if isinstance(m, nn.BatchNorm2d)]
    for k, (weight, bn, bias) in enumerate(layers):
        convs[k].weight.copy_(weight)
        if bias is not None:
            convs[k].bias.copy_(bias)
        if bn is not None:
            bns[k].eps = eps
            for key, value in bn.items():
                getattr(bns[k], key).copy_(value)


@STAGES.register("rm")
class RM(Stage):
    """Turns the residual network into a plain one with the same outputs (RMNet's RM operation)."""

    reforms = True

    options = (
        Bool("fuse_bn", False, "fold every BatchNorm into conv biases (no BatchNorm left to prune by)"),
        Int(
            "stat_images",
            1024,
            "training images whose statistics set the BatchNorms of the reserved channels (not the outputs)",
            lo=1,
        ),
    )

    def prepare(self, ctx, model):
        """The plain network the stages after this one will see (its structure; weights do not matter here)."""
        return rm_convert(model, ctx.cfg.schedule[self.name].fuse_bn)

    def run(self, model, ctx, checkpoint):
        st = ctx.cfg.schedule[self.name]
        tic = time.perf_counter()
        stats = None
        if not st.fuse_bn:
            sample = ctx.sample(st.stat_images)
            stats = block_statistics(model, sample.x, ctx.cfg.trainer.eval_batch_size)
        plain = rm_convert(model, st.fuse_bn, stats)
        top1, loss = ctx.test(plain)
        ctx.run.rows.append(ctx.measure(self.name, plain, top1, loss, top1, 0, time.perf_counter() - tic))
        ctx.run.save(self.name, [plain], done=True)
        return plain


@REGULARIZERS.register("factor_l1")
class ChannelFactors(Regularizer):
    """A learned factor after every channel group's BatchNorm, L1 subgradient + threshold every step (RMNet)."""

    options = (
        Float("alpha", 1e-4, "L1 subgradient strength: grad(m) += alpha * sign(m) (not published; ours)", lo=0.0),
        Float("threshold", 0.01, "factors with |m| <= threshold are zeroed every step (not published; ours)", lo=0.0),
    )
    edits_gradients = True

    def __init__(self, model: nn.Module, **hparams):
        super().__init__(model, **hparams)
        modules = dict(model.named_modules())
        names = [g.bn for g in model.channel_groups() if isinstance(modules[g.bn], nn.BatchNorm2d)]
        if not names:
            raise UserError("regularizer.name", "factor_l1 needs a BatchNorm after the pruned convs")
        convert(model, "factors", [n for n in names if not isinstance(modules[n], ScaledBN)])
        modules = dict(model.named_modules())
        self.layer_names = names
        self._factors = [modules[n].factor for n in names]

    def before_step(self) -> None:
        l1_subgradient_(self._factors, self.hparams["alpha"], self.hparams["threshold"])

    @torch.no_grad()
    def after_step(self) -> None:
        """The threshold once more after the step: momentum's residue never revives a dead factor below it, so a
        dead channel's factor is exactly 0 whenever the network is used or saved (the prune stage removes those)."""
        for f in self._factors:
            f.mul_(f.abs() > self.hparams["threshold"])
