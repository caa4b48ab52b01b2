"""Timing a forward on any device: the one loop every measured latency goes through (whole models in
``engine/latency.py``, layer probes and calibrations in ``structure/cost_model.py``).

Callables are run ``warmup`` times untimed, then ``repeats`` times each, interleaved repeat by repeat (a change of
load falls on all of them alike), each timed with ``time.perf_counter`` between two synchronisations of the device
(CUDA and MPS run asynchronously). The result is each one's median time (or another quantile: a low one is the
steadier figure on a shared machine) and interquartile range in milliseconds (``time_calls``), or every time
(``record_calls``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA and MPS run asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating-point dtype a model computes in (float32 for a model without floating-point parameters)."""
    p = next(model.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


@torch.no_grad()
def record_calls(calls: Sequence[Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> np.ndarray:
    """Every time in milliseconds of each of ``calls``, interleaved: an array of (``repeats``, calls)."""
    for _ in range(warmup):
        for call in calls:
            call()
    synchronize(device)
    times = np.empty((repeats, len(calls)))
    for i in range(repeats):
        for j, call in enumerate(calls):
            synchronize(device)
            tic = time.perf_counter()
            call()
            synchronize(device)
            times[i, j] = 1000 * (time.perf_counter() - tic)
    return times


def time_calls(
    calls: Sequence[Callable[[], object]], device: torch.device, warmup: int, repeats: int, quantile: float = 0.5
) -> list[tuple[float, float]]:
    """(the ``quantile`` of its times, by default the median; their interquartile range) in milliseconds of each of
    ``calls``, interleaved. Other work on the machine only ever adds time, so a low quantile is the steadier figure
    of what a network costs, and the one to compare two networks by."""
    q1, at, q3 = np.quantile(record_calls(calls, device, warmup, repeats), [0.25, quantile, 0.75], axis=0)
    return [(float(a), float(c - b)) for a, b, c in zip(at, q1, q3)]  # linear between order statistics
