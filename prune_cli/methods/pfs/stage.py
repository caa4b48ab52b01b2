"""The gates stage (Pruning from Scratch, Wang et al. AAAI 2020): channel gates trained on the frozen
random init, then the global top gates kept so that the MACs reduction meets ``prune.ratio``
(the gates themselves: ``gates``). With ``prune.residual=true`` the groups several layers hold are gated and
pruned too (a residual stream's channel: one gate, at every BatchNorm holding it)."""

from __future__ import annotations

import sys
import time

from prune_cli.core.errors import UserError
from prune_cli.core.options import Choice, Float, Int
from prune_cli.core.seeds import epoch_generator
from prune_cli.data import batches
from prune_cli.engine.evaluate import evaluate
from prune_cli.engine.settings import capped_epochs
from prune_cli.methods.pfs.gates import Gates, train_gates
from prune_cli.methods.pfs.selection import select_top_gates
from prune_cli.stages.base import STAGES, Stage
from prune_cli.stages.prune import Prune, finish_pruning
from prune_cli.structure.channels import structure


@STAGES.register("gates")
class GatesStage(Stage):
    """Pruning from Scratch: trains channel gates on the frozen random init and prunes by them."""

    prunes = True
    reads = ("prune",)
    shared_groups = True
    groups_of = Prune.groups_of  # the groups the prune stage takes (prune.residual: those several layers hold too)
    options = (
        Int("epochs", 10, "epochs of gate training (10 in the paper)", lo=1),
        Float("lr", 0.01, "Adam learning rate of the gates", lo=0.0, lo_open=True),
        Float("lam", 0.5, "lambda in CE + lambda * (sum|g| / C_total - r)^2", lo=0.0, lo_open=True),
        Float("density", 0.2, "r, the target gate density", lo=0.0, hi=1.0, lo_open=True, hi_open=True),
        Choice(
            "density_key",
            "density",
            ("density", "nonzero"),
            "which density must be <= r for an epoch to be kept: sum|g|/C, or the share of g != 0 (official)",
        ),
        Int("batch_size", 128, "training batch size (default: trainer.batch_size)", lo=1),
    )

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        p = cfg["prune"]
        if p["target"] != "macs":
            raise UserError("prune.target", "the gates stage meets a MACs reduction; set prune.target=macs")
        if p["ratio"] is None:
            raise UserError("prune.ratio", "the gates stage needs the MACs reduction to reach, in (0, 1)")
        if not cfg["dataset"]["val_split"]:
            raise UserError(
                "dataset.val_split",
                "the gates stage keeps the best-validation epoch; hold out a validation split (PFS: 5000)",
            )

    def prepare(self, ctx, model):
        gated = self.groups_of(model, ctx)
        return gated if gated is not model else None  # the stages after it get shared groups

    def run(self, model, ctx, checkpoint):
        cfg, st, data = ctx.cfg, ctx.cfg.schedule[self.name], ctx.data
        tic = time.perf_counter()
        model = self.groups_of(model, ctx)
        gates = Gates(model)

        def train_batches(epoch):
            return batches(
                data.train,
                data,
                st.batch_size,
                train=True,
                generator=epoch_generator(ctx.device, cfg.seed, self.name, epoch),
            )

        def val_accuracy(m):
            return evaluate(m, batches(data.val, data, cfg.trainer.eval_batch_size))[0]

        epochs = capped_epochs(st.epochs, cfg.trainer)
        result = train_gates(
            model,
            gates,
            train_batches,
            val_accuracy,
            epochs=epochs,
            lr=st.lr,
            lam=st.lam,
            target_density=st.density,
            device=ctx.device,
            density_key=st.density_key,
        )
        values = gates.values()
        gates.remove()
        keep, info = select_top_gates(
            values,
            structure(model, ctx.input_shape),
            ctx.reference_macs(),
            cfg.prune.ratio,
            min_channels=cfg.prune.min_channels,
        )
        ctx.run.histories[self.name] = [{"stage": self.name, **h} for h in result["history"]]
        if not info.get("met", True) or not result["qualified"]:
            print(
                f"note: gates stage: {result.get('note', '')} selection {info.get('how')}, "
                f"MACs reduction {info['reduction']:.4f} for a target of {cfg.prune.ratio}",
                file=sys.stderr,
            )
        return finish_pruning(
            model,
            keep,
            values,
            ctx,
            self.name,
            time.perf_counter() - tic,
            extra={"chosen_epoch": result["epoch"] + 1, "gates_qualified": result["qualified"]},
        )
