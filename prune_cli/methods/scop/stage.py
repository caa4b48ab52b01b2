"""SCOP (Tang et al., NeurIPS 2020; docs/methods.md "SCOP"): scientific control with knockoff features.

The registered stage ``scop`` learns, with every weight frozen, one factor ``beta`` per channel of every channel
group: each step a batch of B real images and B knockoffs ``G(z)`` of a pretrained generator runs through the
network as one batch of 2B, and after each group's conv the real half becomes ``beta * x_real + (1 - beta) *
x_knockoff`` (the knockoff half passes unchanged) before the BatchNorm (training mode, statistics over all 2B).
The loss is the cross-entropy of the real half; Adam (lr 0.004, betas (0.5, 0.9)) trains beta, clamped to [0, 1]
after every step. A channel scores ``|gamma| * (2 beta - 1)`` (gamma of the group's BatchNorm); every group loses
its ``floor(rate * C)`` lowest. The pruned network's BatchNorm statistics are then re-estimated by one pass over
the training set in training mode. On a ResNet with ``model.prune_outputs`` the groups are conv_a and conv_b of
every block (conv_b's kept outputs are added into the residual stream by index), as in the paper.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.core.options import Float, Int, Str
from prune_cli.core.seeds import derived, epoch_generator
from prune_cli.data import batches
from prune_cli.engine.settings import capped_epochs
from prune_cli.methods.scop.knockoff import knockoffs, load_generator
from prune_cli.stages.base import STAGES, Stage
from prune_cli.stages.prune import finish_pruning


class KnockoffFactors:
    """beta per channel of every channel group, mixing the real half of a doubled batch with the knockoff half
    right after the group's conv (forward hooks; ``remove()`` takes them off)."""

    def __init__(self, model, init: float = 0.5):
        modules = dict(model.named_modules())
        self.groups = model.channel_groups()
        device = next(model.parameters()).device
        self.betas = [torch.full((modules[g.conv].out_channels,), init, device=device) for g in self.groups]
        for beta in self.betas:
            beta.requires_grad_(True)
        self._hooks = [
            modules[g.conv].register_forward_hook(lambda m, i, out, beta=beta: mix(out, beta))
            for g, beta in zip(self.groups, self.betas)
        ]

    @torch.no_grad()
    def clamp(self) -> None:
        for beta in self.betas:
            beta.clamp_(0.0, 1.0)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def mix(out: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``[beta * real + (1 - beta) * knockoff, knockoff]`` of a conv output whose first half is real."""
    half = out.shape[0] // 2
    real, knockoff = out[:half], out[half:]
    b = beta.view(1, -1, 1, 1).to(out.dtype)
    return torch.cat([b * real + (1 - b) * knockoff, knockoff])


def train_factors(
    model,
    real_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    make_knockoffs: Callable[[int], torch.Tensor],
    epochs: int,
    lr: float = 0.004,
    betas: tuple[float, float] = (0.5, 0.9),
) -> tuple[list[torch.Tensor], list[dict]]:
    """Learn the knockoff factors on ``model`` (weights frozen, BatchNorm in training mode); returns them and the
    per-epoch history. ``real_batches(epoch)`` yields (images, labels); ``make_knockoffs(n)`` gives n knockoffs."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    factors = KnockoffFactors(model)
    optimizer = torch.optim.Adam(factors.betas, lr=lr, betas=betas)
    history = []
    model.train()
    try:
        for epoch in range(epochs):
            tic, n = time.perf_counter(), 0
            loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)  # summed on the device
            for x, y in real_batches(epoch):
                logits = model(torch.cat([x, make_knockoffs(len(x)).to(x.dtype)]))[: len(x)]
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                factors.clamp()
                loss_sum = loss_sum.to(y.device) + loss.detach() * len(y)
                correct = correct.to(y.device) + (logits.detach().argmax(1) == y).sum()
                n += len(y)
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": loss_sum.item() / max(n, 1),
                    "train_acc": 100.0 * correct.item() / max(n, 1),
                    "seconds": time.perf_counter() - tic,
                }
            )
    finally:
        factors.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return [b.detach() for b in factors.betas], history


def scop_scores(model, betas: list[torch.Tensor]) -> list[torch.Tensor]:
    """``|gamma_c| * (beta_c - (1 - beta_c))`` of every channel group (gamma of its BatchNorm)."""
    modules = dict(model.named_modules())
    out = []
    for group, beta in zip(model.channel_groups(), betas):
        bn = modules[group.bn]
        if not isinstance(bn, nn.BatchNorm2d):
            raise UserError("schedule.stages", "the scop stage needs a BatchNorm after every pruned conv")
        out.append((bn.weight.detach().abs() * (2 * beta - 1)).float().cpu())
    return out


def lowest_per_layer(scores: list[torch.Tensor], rate: float) -> list[torch.Tensor]:
    """Keep masks removing the ``floor(rate * C)`` lowest scores of every group (ties: the lower index first)."""
    keep = []
    for s in scores:
        k = torch.ones(len(s), dtype=torch.bool)
        k[torch.sort(s, stable=True).indices[: int(rate * len(s))]] = False
        keep.append(k)
    return keep


@torch.no_grad()
def recalibrate_bn(model, real_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One pass in training mode without gradients: the BatchNorm running statistics follow the pruned network."""
    was_training = model.training
    model.train()
    for x, _ in real_batches:
        model(x)
    model.train(was_training)


@STAGES.register("scop")
class ScopStage(Stage):
    """SCOP: knockoff factors learned with the weights frozen, a uniform per-layer rate, BN statistics re-estimated."""

    prunes = True
    options = (
        Str(
            "generator_path",
            None,
            "the pretrained CIFAR knockoff generator (the official netG_cifar.pth); required",
            nullable=True,
        ),
        Int("epochs", 20, "epochs of factor learning (official 20)", lo=1),
        Float("lr", 0.004, "Adam learning rate of the factors (official 0.004)", lo=0.0, lo_open=True),
        Float("beta1", 0.5, "Adam beta1 (official 0.5)", lo=0.0, hi=1.0, hi_open=True),
        Float("beta2", 0.9, "Adam beta2 (official 0.9)", lo=0.0, hi=1.0, hi_open=True),
        Int("batch_size", 512, "real images per step, each with as many knockoffs (official 512)", lo=1),
        Float(
            "rate",
            0.4,
            "every group loses floor(rate * C) channels (official --prune_rate 0.4)",
            lo=0.0,
            hi=1.0,
            hi_open=True,
        ),
        Int("bn_batch_size", 1024, "batch size of the pass that re-estimates BN statistics (official 1024)", lo=1),
    )

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        if cfg["schedule"]["scop"]["generator_path"] is None:
            raise UserError(
                "schedule.scop.generator_path",
                "SCOP needs its pretrained knockoff generator: the official netG_cifar.pth (see docs/methods.md)",
            )

    def prepare(self, ctx, model) -> None:
        if tuple(ctx.input_shape) != (3, 32, 32):
            shape = "x".join(map(str, ctx.input_shape))
            raise UserError(
                "dataset.name", f"the CIFAR knockoff generator makes 3x32x32 images; this dataset's are {shape}"
            )
        load_generator(ctx.cfg.schedule[self.name].generator_path, "cpu")
        scop_scores(model, [torch.zeros(w) for w in model.widths])

    def run(self, model, ctx, checkpoint):
        cfg, st, data = ctx.cfg, ctx.cfg.schedule[self.name], ctx.data
        tic = time.perf_counter()
        generator = load_generator(st.generator_path, ctx.device)
        rng = torch.Generator(device=ctx.device).manual_seed(derived(cfg.seed, "knockoff"))

        def real_batches(epoch):
            gen = epoch_generator(ctx.device, cfg.seed, self.name, epoch)
            return batches(data.train, data, st.batch_size, train=True, generator=gen)

        epochs = capped_epochs(st.epochs, cfg.trainer)
        betas, history = train_factors(
            model, real_batches, lambda n: knockoffs(generator, n, rng), epochs, st.lr, (st.beta1, st.beta2)
        )
        ctx.run.histories[self.name] = [{"stage": self.name, **h} for h in history]
        scores = scop_scores(model, betas)
        keep = lowest_per_layer(scores, st.rate)
        recalibration = epoch_generator(ctx.device, cfg.seed, f"{self.name}_bn", 0)

        def recalibrated(pruned):
            recalibrate_bn(pruned, batches(data.train, data, st.bn_batch_size, train=True, generator=recalibration))
            return pruned

        extra = {"prune_rate": st.rate, "knockoff_source": f"pretrained generator {Path(st.generator_path).name}"}
        return finish_pruning(
            model, keep, scores, ctx, self.name, time.perf_counter() - tic, extra, reshape=recalibrated
        )
