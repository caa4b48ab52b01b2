"""Measured inference latency: the real time of a forward pass on the run's device, next to the counted MACs.

A run that prunes (``latency: on``, the default) times the dense and the pruned model together when its pruning
stage finishes (``time_pruning``, called by ``stages.prune.finish_pruning``); the ``latency`` stage times whatever
model it gets (any checkpoint, with ``init_from``). Both time with ``time_models``:

- eval mode under ``torch.no_grad()``, on random inputs of the run's input shape, on its device, in the model's dtype
  (as the evaluation runs: no autocast), drawn from a generator of their own (the run's random state is untouched);
- ``WARMUP`` untimed forwards, then ``REPEATS`` timed ones with ``time.perf_counter``, the device synchronised
  before and after each one on CUDA (and MPS), the models interleaved repeat by repeat so that a change of load
  falls on all of them alike;
- the median and the interquartile range in milliseconds, at batch 1 and at ``trainer.eval_batch_size`` (N), with
  torch's thread count.

Columns (``COLUMNS``): ``latency_ms_b1``, ``latency_iqr_ms_b1``, ``latency_ms_bN``, ``latency_iqr_ms_bN``,
``latency_batch`` (N), ``latency_threads``; the pruned row adds ``speedup_b1`` and ``speedup_bN`` (dense / pruned
median latency). Like ``seconds`` they are timing columns (``report.timing_column``): never compared for equality.
"""

from __future__ import annotations

import copy
from functools import partial

import torch

from prune_cli.core.timing import model_dtype, time_calls
from prune_cli.models.layers import fold

WARMUP = 3  # untimed forwards per model and batch size (allocations, kernel selection, caches)
REPEATS = 21  # timed forwards per model and batch size (odd: the median is one of them)
COLUMNS = (
    "latency_ms_b1",
    "latency_iqr_ms_b1",
    "latency_ms_bN",
    "latency_iqr_ms_bN",
    "latency_batch",
    "latency_threads",
)


def enabled(cfg) -> bool:
    """Whether ``latency`` is on (``on`` or YAML's bare ``on``, which reads as true); a config from before the
    option existed has it off, as those runs had."""
    return cfg.get("latency", "off") in ("on", True)


@torch.no_grad()
def time_models(
    models: list[torch.nn.Module],
    input_shape,
    batch: int,
    device,
    *,
    warmup: int = WARMUP,
    repeats: int = REPEATS,
) -> list[tuple[float, float]]:
    """(median, interquartile range) in milliseconds of one forward of each model at ``batch``, interleaved."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_shape, generator=generator)
    inputs = [x.to(device=device, dtype=model_dtype(m)) for m in models]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        return time_calls([partial(m, xi) for m, xi in zip(models, inputs)], device, warmup, repeats)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def latency_columns(models: list[torch.nn.Module], input_shape, batch_size: int, device) -> list[dict]:
    """The latency columns of each model: median and interquartile range at batch 1 and at ``batch_size``."""
    small = time_models(models, input_shape, 1, device)
    large = time_models(models, input_shape, batch_size, device)
    return [
        {
            "latency_ms_b1": b1,
            "latency_iqr_ms_b1": iqr1,
            "latency_ms_bN": bn,
            "latency_iqr_ms_bN": iqrn,
            "latency_batch": batch_size,
            "latency_threads": torch.get_num_threads(),
        }
        for (b1, iqr1), (bn, iqrn) in zip(small, large)
    ]


def speedups(dense: dict, pruned: dict) -> dict:
    """``speedup_b1`` / ``speedup_bN``: dense over pruned median latency (above 1: the pruned model is faster)."""
    return {
        "speedup_b1": dense["latency_ms_b1"] / pruned["latency_ms_b1"],
        "speedup_bN": dense["latency_ms_bN"] / pruned["latency_ms_bN"],
    }


def deployed(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` as it is delivered: training-time factors (skeletons, channel factors) folded into the
    weights, as the tables count it."""
    return fold(copy.deepcopy(model))
