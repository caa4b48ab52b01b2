"""Accuracy and loss of a model over batches (summed over the ranks of a distributed run)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prune_cli.core import distributed


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches, shared: bool = False) -> tuple[float, float]:
    """(top-1 accuracy in percent, mean cross-entropy) over an iterable of (x, y) batches.

    Under ``torch.inference_mode`` (no autograd bookkeeping at all); nothing it computes outlives the call.
    ``shared``: every process of a distributed run got its own part of the batches; their totals are summed."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    loss_sum, count = None, 0
    for x, y in batches:
        logits = model(x).float()
        batch_loss = F.cross_entropy(logits, y, reduction="sum")
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = correct.to(y.device) + (logits.argmax(1) == y).sum()
        count += len(y)
    model.train(was_training)
    if shared:
        totals = torch.tensor(
            [correct.item(), 0.0 if loss_sum is None else loss_sum.item(), count], dtype=torch.float64
        )
        distributed.all_sum(totals)
        correct, loss_sum, count = totals[0], totals[1], int(totals[2])
    if count == 0:
        return float("nan"), float("nan")
    return 100.0 * correct.item() / count, loss_sum.item() / count
