"""``prune.target=latency`` in the stages that prune: the run's cost model, built once on the network the pruning
stage receives, bound to every structure a selection measures; the selection aimed at the measured latency; the
pruned network timed against the target (docs/methods.md "Latency targets").

The cost model (``structure/cost_model.py``) is measured at ``prune.latency_batch`` on the run's device, thread
count, dtype and memory format, from the cache in ``prune.latency_cache`` where it holds the measurements; with
``latency=off`` (smoke runs) it is built from a small grid. ``aimed`` corrects the share asked of the (last)
selection until the pruned network, timed, is within 2% of the target. The pruned row gets
``latency_model_seconds`` (the cost model's build), ``latency_aim_share`` and ``latency_aim_rounds`` (the share
that met it, the selections timed; 0: the share came from the cache), ``latency_target_batch``,
``latency_dense_ms`` and ``latency_measured_ms`` (the received and the pruned network timed together again at the
latency batch), ``latency_target_ms`` (the dense time less ``prune.ratio`` of it), ``latency_predicted_ms`` (the
cost model's predicted share applied to the measured dense time), ``latency_target_speedup``,
``latency_measured_speedup`` and ``latency_check``: ``ok``, or ``miss`` with the signed error when the measured
latency is more than ``MISS`` off the target (also printed). All are timing columns.
"""

from __future__ import annotations

import sys

import torch
from omegaconf import OmegaConf

from prune_cli.core import distributed
from prune_cli.core.checkpoint import weights_digest
from prune_cli.engine import latency
from prune_cli.engine.settings import resolve_memory_format
from prune_cli.structure import cost_model
from prune_cli.structure.channels import prune_channels, structure

MISS = 0.05  # a measured latency more than this (relative) off the target is flagged


def wanted(ctx) -> bool:
    """Whether the run selects to a latency: the target, a ratio (not a criterion's own threshold) and no hand-set
    ``layer_ratios`` (which replace the target)."""
    p = ctx.cfg.prune
    return p.get("target") == "latency" and p.ratio is not None and not p.layer_ratios


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
            step=ctx.cfg.prune.get("round_to", 1),
        )
        if distributed.is_main():
            how = "measured" if ctx.cost_model.measured else "read from the cache"
            print(f"latency cost model: {how} in {ctx.cost_model.seconds:.1f} s", file=sys.stderr)
    return ctx.cost_model


def aimed(select, model, ctx, ratio: float, received) -> tuple:
    """(keep, scores, row columns) of ``select(share)`` (the stage's selection on ``model`` to a predicted share),
    its widths given back where faster (``given_back``), aimed at ``prune.ratio`` of the received network's
    measured latency (``cost_model.aim``; ``ratio``: the share asked first). The share that met it is cached, keyed
    by the problem (the weights, the ``prune`` and ``criterion`` settings, the setting), so a resumed run asks it
    at once and selects the same channels."""
    p = ctx.cfg.prune
    select = given_back(select, model, ctx)
    cache = cost_model.Cache(p.get("latency_cache"))
    key = {"aim": problem(model, ctx), "widths": "given back", **setting(received, ctx).key()}
    stored = cache.get(key)
    if stored is not None:
        keep, scores, stats = select(stored["asked"])
        return keep, scores, {**stats, "latency_aim_share": stored["asked"], "latency_aim_rounds": 0}
    timer = cost_model.DeviceTimer(setting(received, ctx))
    rounds = 2 if timer.setting.quick else cost_model.AIM_ROUNDS  # a smoke run checks the path, not the clock
    dense = latency.deployed(received)

    def time_pair(selected):
        return tuple(timer.compare([dense, latency.deployed(prune_channels(model, selected[0]))], ctx.input_shape))

    (keep, scores, stats), asked, timed = cost_model.aim(p.ratio, select, time_pair, start=ratio, rounds=rounds)
    cache.put(key, {"asked": asked, "rounds": timed})
    return keep, scores, {**stats, "latency_aim_share": asked, "latency_aim_rounds": len(timed)}


def given_back(select, model, ctx):
    """``select`` with its widths given back (``cost_model.widened``: a group stopped short of a faster multiple
    of 8 gets back its best-scoring channels), and the row's ``latency_selected_share``: the share the selection
    reached by the prices it searched (a target out of reach is judged by it)."""
    priced = priced_structure(model, ctx).latency
    dense = priced.ms(model.widths)

    def select_and_give_back(share):
        keep, scores, stats = select(share)
        selected = 1 - priced.ms([int(k.sum()) for k in keep]) / dense
        keep = cost_model.widened(keep, scores, lambda w: priced.ms(w, stairs=False), ctx.cfg.prune.round_to)
        return keep, scores, {**stats, "latency_selected_share": selected}

    return select_and_give_back


def problem(model, ctx) -> dict:
    """What decides a selection: the network and its weights, the ``prune`` and ``criterion`` settings."""
    settings = {g: OmegaConf.to_container(ctx.cfg[g], resolve=True) for g in ("prune", "criterion")}
    network = cost_model.signature(model, ctx.input_shape)
    return {"weights": weights_digest(model.state_dict()), "network": network, **settings}


def setting(model, ctx) -> cost_model.Setting:
    layout = resolve_memory_format(ctx.cfg.trainer.get("memory_format", "auto"), ctx.device)
    return cost_model.setting_of(model, ctx.cfg.prune.get("latency_batch", 1), layout, not latency.enabled(ctx.cfg))


def uniform(model, share: float):
    """A copy of ``model`` keeping the first ``share`` of every group's channels (at least one)."""
    keep = [torch.arange(w) < max(1, round(share * w)) for w in model.widths]
    return prune_channels(model, keep)


def check_pruned(ctx, dense, pruned) -> dict:
    """The latency columns of the pruned row: target, prediction (of the widths as they run), measurement, and
    whether they agree; a target beyond reach (every removable channel gone, the selection's prices short of it) is
    said in one line."""
    p, cost, row = ctx.cfg.prune, ctx.cost_model, ctx.run.rows[-1]
    predicted_dense = cost.predict(cost_model.weight_dims(dense, cost.layers), stairs=False)
    predicted = cost.predict(cost_model.weight_dims(pruned, cost.layers), stairs=False)
    loud = distributed.is_main()
    # every removable channel went, short of what was asked (of the received network: one step)
    if p.steps == 1 and row["latency_selected_share"] < row["latency_aim_share"] * (1 - p.tolerance) and loud:
        print(
            f"prune.ratio: {p.ratio} of the latency is out of reach; pruned to the fastest reachable, "
            f"{1 - predicted / predicted_dense:.4f} removed (predicted, {predicted_dense / predicted:.2f}x)",
            file=sys.stderr,
        )
    timer = cost_model.DeviceTimer(setting(dense, ctx))
    dense_ms, pruned_ms = timer.compare([latency.deployed(dense), latency.deployed(pruned)], ctx.input_shape)
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
