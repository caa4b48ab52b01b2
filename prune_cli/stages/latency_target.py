"""``prune.target=latency`` in the stages that prune: the run's cost model, built once on the network the pruning
stage receives, bound to every structure a selection measures, and the pruned network timed against its
prediction (docs/methods.md "Latency targets").

The cost model (``structure/cost_model.py``) is measured at ``prune.latency_batch`` on the run's device, thread
count, dtype and memory format, from the cache in ``prune.latency_cache`` where it holds the measurements; with
``latency=off`` (smoke runs) it is built from a small grid. The pruned row gets ``latency_model_seconds`` (its build),
``latency_target_batch``, ``latency_dense_ms`` and ``latency_measured_ms`` (the received and the pruned network
timed together at the latency batch), ``latency_target_ms`` (the dense time less ``prune.ratio`` of it),
``latency_predicted_ms`` (the cost model's predicted share applied to the measured dense time),
``latency_target_speedup``, ``latency_measured_speedup`` and ``latency_check``: ``ok``, or ``miss`` with the signed
error when the measured latency is more than ``MISS`` off the target (also printed). All are timing columns.
"""

from __future__ import annotations

import sys

import torch

from prune_cli.core import distributed
from prune_cli.engine import latency
from prune_cli.engine.settings import resolve_memory_format
from prune_cli.structure import cost_model
from prune_cli.structure.channels import prune_channels, structure

MISS = 0.05  # a measured latency more than this (relative) off the target is flagged


def wanted(ctx) -> bool:
    return ctx.cfg.prune.get("target") == "latency"


def priced_structure(model, ctx):
    """``structure(model)``, with the run's cost model bound when the target is latency."""
    st = structure(model, ctx.input_shape)
    if wanted(ctx):
        st.latency = cost_model.Predictor(cost_of(model, ctx), model, st)
    return st


def cost_of(model, ctx) -> cost_model.CostModel:
    """The run's cost model: built on the first model asked for (the network the pruning stage receives, its
    training-time factors folded), then the same for every later (narrower) one, so iterative steps price widths
    alike."""
    if ctx.cost_model is None:
        ctx.cost_model = cost_model.build(
            model,
            ctx.input_shape,
            setting(model, ctx),
            lambda share: uniform(model, share),
            cost_model.Cache(ctx.cfg.prune.get("latency_cache")),
        )
        if distributed.is_main():
            how = "measured" if ctx.cost_model.measured else "read from the cache"
            print(f"latency cost model: {how} in {ctx.cost_model.seconds:.1f} s", file=sys.stderr)
    return ctx.cost_model


def setting(model, ctx) -> cost_model.Setting:
    layout = resolve_memory_format(ctx.cfg.trainer.get("memory_format", "auto"), ctx.device)
    return cost_model.setting_of(model, ctx.cfg.prune.get("latency_batch", 1), layout, not latency.enabled(ctx.cfg))


def uniform(model, share: float):
    """A copy of ``model`` keeping the first ``share`` of every group's channels (at least one)."""
    keep = [torch.arange(w) < max(1, round(share * w)) for w in model.widths]
    return prune_channels(model, keep)


def check_pruned(ctx, dense, pruned) -> dict:
    """The latency columns of the pruned row: target, prediction, measurement, and whether they agree; a target
    beyond reach (every removable channel gone, predicted short of it) is said in one line."""
    p, cost = ctx.cfg.prune, ctx.cost_model
    predicted_dense = cost.predict(cost_model.weight_dims(dense, cost.layers))
    predicted = cost.predict(cost_model.weight_dims(pruned, cost.layers))
    reached = 1 - predicted / predicted_dense
    loud = distributed.is_main()
    if reached < p.ratio * (1 - p.tolerance) and loud:
        print(
            f"prune.ratio: {p.ratio} of the latency is out of reach; pruned to the fastest reachable, "
            f"{reached:.4f} removed (predicted, {1 / (1 - reached):.2f}x)",
            file=sys.stderr,
        )
    timer = cost_model.DeviceTimer(setting(dense, ctx))
    dense_ms, pruned_ms = timer.models([latency.deployed(dense), latency.deployed(pruned)], ctx.input_shape)
    target = dense_ms * (1 - p.ratio)
    error = pruned_ms / target - 1
    check = "ok" if abs(error) <= MISS else f"miss {error:+.1%}"
    if check != "ok" and loud:
        print(
            f"warning: prune.target=latency: the pruned network measures {pruned_ms:.2f} ms at batch "
            f"{timer.setting.batch}, {error:+.1%} off the target {target:.2f} ms ({1 / (1 - p.ratio):.2f}x)",
            file=sys.stderr,
        )
    return {
        "latency_model_seconds": cost.seconds,
        "latency_target_batch": timer.setting.batch,
        "latency_target_ms": target,
        "latency_predicted_ms": predicted * dense_ms / predicted_dense,
        "latency_measured_ms": pruned_ms,
        "latency_dense_ms": dense_ms,
        "latency_target_speedup": 1 / (1 - p.ratio),
        "latency_measured_speedup": dense_ms / pruned_ms,
        "latency_check": check,
    }
