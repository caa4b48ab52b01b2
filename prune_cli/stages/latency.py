"""The latency stage: times the model it gets (``engine/latency.py``) and adds its row; the model goes on unchanged.

With ``init_from`` it measures any checkpoint without reading data: ``prune-cli schedule=latency
init_from=RUN/checkpoints/finetune.pt model=... dataset=...``. It times whatever ``latency`` says (the option is
about the runs that prune).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from prune_cli.core.checkpoint import load_checkpoint
from prune_cli.engine import latency
from prune_cli.engine.latency import deployed, speedups
from prune_cli.models import build_model
from prune_cli.models.layers import fold
from prune_cli.stages.base import STAGES, Stage, dense_and_final


@STAGES.register("latency")
class Latency(Stage):
    """Times the model at batch 1 and at trainer.eval_batch_size; its row repeats the previous row's accuracy."""

    shared_groups = True

    def run(self, model, ctx, checkpoint):
        tic = time.perf_counter()
        (columns,) = latency.latency_columns(
            [deployed(model)], ctx.input_shape, ctx.cfg.trainer.eval_batch_size, ctx.device
        )
        # the model is unchanged: its accuracy is the previous row's (not tested again, so no data is read)
        last = ctx.run.rows[-1] if ctx.run.rows else {}
        nan = float("nan")
        row = ctx.measure(
            self.name,
            model,
            last.get("top1", nan),
            last.get("loss", nan),
            last.get("best_top1", nan),
            0,
            time.perf_counter() - tic,
        )
        ctx.run.rows.append({**row, **columns})
        ctx.run.save(self.name, [model], done=True)
        return model


def time_pruning(ctx, received: torch.nn.Module, pruned: torch.nn.Module) -> None:
    """Time the dense and the pruned model together and write the columns into the tables: the dense row (the one
    the tables call dense, ``stages.base.dense_and_final``) gets its latency, the pruned row (the last) its own and the
    speed-ups. ``received``: the model the pruning stage removed channels from (timed when the dense row's model
    cannot be rebuilt)."""
    rows = ctx.run.rows
    pair = dense_and_final(rows)  # None only for a stage that prunes without saying so (``Stage.prunes``)
    dense_row = pair[0] if pair else None
    dense = dense_model(ctx, dense_row["stage"], received) if dense_row else deployed(received)
    dense_cols, pruned_cols = latency.latency_columns(
        [dense, deployed(pruned)], ctx.input_shape, ctx.cfg.trainer.eval_batch_size, ctx.device
    )
    if dense_row is not None:
        dense_row.update(dense_cols)
    rows[-1].update({**pruned_cols, **speedups(dense_cols, pruned_cols)})


def dense_model(ctx, stage: str, received: torch.nn.Module) -> torch.nn.Module:
    """The model of the dense row ``stage``, to time: the configured model as built for ``init``; else that stage's
    finished checkpoint in this run's directory or beside ``init_from``; else (neither exists) the model the pruning
    stage received. Training-time factors folded; built without touching the run's random state."""
    init_from = ctx.cfg.get("init_from")
    with torch.random.fork_rng(devices=[]):  # building initialises weights: the run's random state stays as it was
        if stage == "init" and init_from is None:
            return build_model(ctx.arch()).to(ctx.device)
        candidates = [ctx.run.ckpt_dir / f"{stage}.pt"]
        if init_from is not None:
            candidates.append(Path(init_from).parent / f"{stage}.pt")
        for path in candidates:
            if not path.is_file():
                continue
            ck = load_checkpoint(path)
            if ck.get("stage") == stage and ck.get("done"):
                model = build_model(ck["arch"])
                model.load_state_dict(ck["state_dict"])
                return fold(model).to(ctx.device)
    return deployed(received)
