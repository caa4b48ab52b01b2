"""The latency stage: times the model it gets (``prune_cli/latency.py``) and adds its row; the model goes on unchanged.

With ``init_from`` it measures any checkpoint without reading data: ``prune-cli schedule=latency
init_from=RUN/checkpoints/finetune.pt model=... dataset=...``. It times whatever ``latency`` says (the option is
about the runs that prune).
"""

from __future__ import annotations

import time

from ..latency import deployed, latency_columns
from .base import STAGES, Stage


@STAGES.register("latency")
class Latency(Stage):
    """Times the model at batch 1 and at trainer.eval_batch_size; its row repeats the previous row's accuracy."""

    shared_groups = True

    def run(self, model, ctx, checkpoint):
        tic = time.perf_counter()
        (columns,) = latency_columns([deployed(model)], ctx.input_shape, ctx.cfg.trainer.eval_batch_size, ctx.device)
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
