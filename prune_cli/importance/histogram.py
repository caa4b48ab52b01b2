"""Entropy of weight histograms: the one implementation behind the entropy criterion and filter grafting."""

from __future__ import annotations

import torch


def histogram_entropy(rows: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Entropy (nats) of a ``bins``-bin histogram of each row of a 2-D tensor, bins spanning the row's min..max.

    Bin k of a row holds values in [lo + k*w, lo + (k+1)*w), the last bin also its max (as
    numpy.histogram); p_k = count_k / D; H = -sum_k p_k log p_k with 0 log 0 = 0. A constant row has
    every value in one bin: H = 0. Computed in the rows' dtype (pass float64 for reference precision).
    """
    rows = rows.detach()
    lo = rows.min(dim=1, keepdim=True).values
    span = rows.max(dim=1, keepdim=True).values - lo
    scale = torch.where(span > 0, bins / span, torch.zeros_like(span))  # constant row: every value in bin 0
    idx = ((rows - lo) * scale).floor().long().clamp_(0, bins - 1)
    counts = torch.zeros(rows.shape[0], bins, dtype=rows.dtype, device=rows.device)
    counts.scatter_add_(1, idx, torch.ones_like(rows))
    p = counts / rows.shape[1]
    return -torch.special.xlogy(p, p).sum(dim=1)
