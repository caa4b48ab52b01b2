"""gRDA, generalized regularized dual averaging (Chao et al., NeurIPS 2020, "Directional Pruning of Deep Neural
Networks"; docs/methods.md "gRDA"): an optimizer whose soft threshold grows with the steps, so weights reach
exact zeros during training (unstructured sparsity).

Per parameter: ``A_0 = w_0``; each step ``A_n = A_(n-1) - lr_n * grad_n``, the threshold grows by
``c * lr_n^(1/2 + mu) * (n^mu - (n - 1)^mu)`` (so with a constant lr it is ``c * lr^(1/2 + mu) * n^mu``), and
``w_n = sign(A_n) * max(|A_n| - threshold_n, 0)``. No momentum, no weight decay.

A plug-in of the training engine: ``optimizer=grda`` in a training stage, with its ``grda`` block (c, mu).
"""

from __future__ import annotations

import torch

from prune_cli.core.options import Float, Section
from prune_cli.engine.optimizers import OPTIMIZERS, OptimizerBuilder

BLOCK = Section(
    "grda",
    (
        Float("c", 0.005, "the threshold's scale c (the authors advise 0 < c < 0.005)", lo=0.0),
        Float("mu", 0.51, "the threshold's growth exponent mu (advised: 0.501, 0.51, 0.55)", lo=0.0, lo_open=True),
    ),
    "optimizer=grda (Chao et al., NeurIPS 2020): threshold c * lr^(1/2 + mu) * n^mu; no momentum, no weight decay",
    absent={"c": 0.005, "mu": 0.51},  # runs written before the block (which could not use gRDA) hold its defaults
)


class GRDA(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.01, c: float = 0.005, mu: float = 0.51):
        if lr < 0 or c < 0 or mu <= 0:
            raise ValueError(f"gRDA needs lr >= 0, c >= 0 and mu > 0; got {lr}, {c}, {mu}")
        super().__init__(params, dict(lr=lr, c=c, mu=mu))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, c, mu = group["lr"], group["c"], group["mu"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # the accumulator starts at the initial weights
                    state["step"] = 0
                    state["accumulator"] = p.detach().clone()
                    state["threshold"] = 0.0
                state["step"] += 1
                n = state["step"]
                state["accumulator"].add_(p.grad, alpha=-lr)
                state["threshold"] += c * lr ** (0.5 + mu) * (n**mu - (n - 1) ** mu)
                a = state["accumulator"]
                p.copy_(torch.sign(a) * (a.abs() - state["threshold"]).clamp_min(0))
        return loss


@OPTIMIZERS.register("grda")
class GRDABuilder(OptimizerBuilder):
    """gRDA with the stage's lr and its ``grda`` block: no momentum and no weight decay (the threshold is its
    regularization)."""

    options = (BLOCK,)
    note = "see the grda block"

    @classmethod
    def build(cls, params, st) -> torch.optim.Optimizer:
        return GRDA(params, lr=st.lr, c=st.grda.c, mu=st.grda.mu)
