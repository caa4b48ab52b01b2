"""Accuracy, loss, params and MACs of a model (counting conventions of methods.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: torch.nn.Module) -> int:
    """Every element of model.parameters(): BN affine and biases included, buffers excluded."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, input_shape: tuple[int, int, int]) -> int:
    """MACs of conv + linear layers for one image: FlopCounterMode counts exactly those as 2*MACs."""
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> tuple[float, float]:
    """(top-1 accuracy in percent, mean cross-entropy) over an iterable of (x, y) batches."""
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
    if count == 0:
        return float("nan"), float("nan")
    return 100.0 * correct.item() / count, loss_sum.item() / count
