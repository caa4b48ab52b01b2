"""The training stages: pretrain, sparse_train, finetune and scratch share one implementation.

Their differences are declared as class attributes: ``regularized`` (the configured regularizer is
added to the loss), ``fresh_init`` (the pruned architecture is re-initialised, Liu et al. 2019; with
``budget: B`` its epochs scale by MACs_dense / MACs_pruned) and ``copy_partners`` (networks a training
hook trains beside the model start as copies of it rather than new initialisations).

Their options are the loop's own plus what the engine's registries offer: every registered optimizer and lr
schedule, and the option blocks of the optimizers and training hooks that methods register; and the ``distill``
block (``stages/distill.py``): a teacher whose outputs join the labels in the loss.
"""

from __future__ import annotations

import copy

import torch

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool, Choice, Float, Int, List, Option, Value
from prune_cli.engine.hooks import TRAINING_HOOKS, active_hooks
from prune_cli.engine.loop import fit
from prune_cli.engine.optimizers import OPTIMIZERS, optimizer_option
from prune_cli.engine.schedules import LR_SCHEDULE, schedule_option
from prune_cli.engine.settings import capped_epochs
from prune_cli.importance.criteria import channel_vectors
from prune_cli.importance.regularizers import build_regularizer, sparsity_stats
from prune_cli.models import build_model
from prune_cli.stages import distill
from prune_cli.stages.base import STAGES, Stage
from prune_cli.stages.prune import regularized_groups
from prune_cli.structure.counting import count_macs

EPOCHS = Int("epochs", 30, "epochs of this stage (scratch with budget B scales it)", lo=0)
OPTIMIZER_SETTINGS = (
    Float("lr", 0.1, "initial learning rate", lo=0.0, lo_open=True),
    Float("momentum", 0.9, "SGD momentum (adam: beta1)", lo=0.0, hi=1.0, hi_open=True),
    Bool("nesterov", False, "SGD Nesterov momentum"),
    Float("weight_decay", 5.0e-4, "L2 weight decay", lo=0.0),
)
SCHEDULE_SETTINGS = (
    List(
        "milestones",
        [0.5, 0.75],
        "multistep: decay points as fractions of the epochs; linear: where the ramp starts and ends",
        item=Value("float", lo=0.0, hi=1.0, lo_open=True),
    ),
    Float("step_size", 0.3333, "step: decay every this fraction of the epochs", lo=0.0, hi=1.0, lo_open=True),
    Float(
        "gamma", 0.1, "lr decay factor of multistep / step; linear: the final lr is lr * gamma", lo=0.0, lo_open=True
    ),
)
STAGE_SETTINGS = (
    Int("batch_size", 128, "training batch size (default: trainer.batch_size)", lo=1),
    Choice("budget", "E", ("E", "B"), "scratch only: E keeps the epochs; B scales them by MACs_dense / MACs_pruned"),
)
# the options declared here (other stages copy some); a training stage's ``options`` add the registries' parts
OPTIONS = (EPOCHS, *OPTIMIZER_SETTINGS, LR_SCHEDULE, *SCHEDULE_SETTINGS, *STAGE_SETTINGS)


def training_options() -> tuple[Option, ...]:
    """A training stage's options: its own, the choice of every registered optimizer and lr schedule, and the
    blocks registered optimizers and training hooks add (by block name)."""
    parts = [part for registry in (OPTIMIZERS, TRAINING_HOOKS) for _, part in registry.items()]
    blocks = sorted((distill.BLOCK, *(block for part in parts for block in part.options)), key=lambda b: b.name)
    return (
        EPOCHS,
        optimizer_option(),
        *OPTIMIZER_SETTINGS,
        schedule_option(),
        *SCHEDULE_SETTINGS,
        *STAGE_SETTINGS,
        *blocks,
    )


class RegisteredOptions:
    """``TrainStage.options``, built when read: by then every module has registered its optimizers and hooks
    (a tuple built while this module is imported would miss those of the methods, imported after it)."""

    def __get__(self, stage, owner) -> tuple[Option, ...]:
        return training_options()


class TrainStage(Stage):
    options = RegisteredOptions()
    shared_groups = True
    regularized = False
    fresh_init = False
    copy_partners = False
    teacher: distill.Teacher | None = None  # named by the stage's distill block: built by prepare, before any data

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        distill.check_config(cfg, cls.name)
        st = cfg["schedule"][cls.name]
        if st["lr_schedule"] == "linear" and not (
            len(st["milestones"]) == 2 and st["milestones"][0] < st["milestones"][1]
        ):
            raise UserError(
                f"schedule.{cls.name}.milestones",
                f"lr_schedule=linear needs two increasing fractions [start, end] of the ramp; got {st['milestones']}",
            )

    def prepare(self, ctx, model) -> None:
        self.teacher = distill.prepared_teacher(ctx, self.name)
        if self.regularized:  # a regularizer that selects no layer of this model fails now, not after pretraining
            build_regularizer(ctx.cfg.regularizer, copy.deepcopy(regularized_groups(model, ctx)))  # it may set BNs

    def run(self, model, ctx, checkpoint):
        cfg, run = ctx.cfg, ctx.run
        st = self.settings(cfg.schedule[self.name])
        epochs = st.epochs
        if self.fresh_init:
            model = ctx.build(model.arch, seed_salt=self.name)
            if st.budget == "B":  # same compute as the dense model: scale epochs by MACs_dense / MACs_pruned
                epochs = round(epochs * ctx.reference_macs() / count_macs(model, ctx.input_shape))
        epochs = capped_epochs(epochs, cfg.trainer)
        if checkpoint is None:
            model = self.transform(model, ctx)
        for p in model.parameters():  # a model coming from the gates stage was frozen
            p.requires_grad_(True)
        hooks = active_hooks(st)
        partners = [
            p for hook in hooks for p in hook.partners(model, copies=self.copy_partners, seed=cfg.seed, stage=self.name)
        ]
        models = [model] + partners
        if checkpoint is not None:
            models = [build_model(checkpoint["arch"]).to(ctx.device) for _ in models]
        # built before a resumed state is loaded: a regularizer may initialise weights (e.g. BN gamma = 0.5)
        regularizer = self.loss_terms(models[0], ctx)
        taught = distill.teaching(self.teacher, ctx, self.name)
        recorded = taught.columns() if taught is not None else {}
        start, optimizer_states, history = 0, None, []
        if checkpoint is not None:  # an interrupted stage: continue after its last finished epoch
            if taught is not None:
                taught.check_same(checkpoint.get("distill"), self.name)
            for m, state in zip(models, checkpoint["states"]):
                m.load_state_dict(state)
            start, optimizer_states = checkpoint["epoch"], checkpoint["optimizers"]
            history = checkpoint["histories"].get(self.name, [])
            run.restore(checkpoint)

        def save_epoch(epoch, optimizers, hist):
            run.histories[self.name] = hist
            run.save(self.name, models, done=False, epoch=epoch, optimizers=optimizers, extra={"distill": recorded})
            run.write_tables()

        history = fit(
            models,
            ctx.data,
            st,
            stage=self.name,
            epochs=epochs,
            seed=cfg.seed,
            trainer=cfg.trainer,
            regularizer=regularizer,
            start_epoch=start,
            optimizer_states=optimizer_states,
            history=history,
            on_epoch_end=save_epoch,
            hooks=hooks,
            distill=taught.distiller() if taught is not None else None,
        )
        run.histories[self.name] = history
        row = finished_row(self.name, models, history, epochs, ctx)
        model = models[row.get("continued", 0)]
        row.update(recorded, **self.row_extras(model, ctx))
        run.rows.append(row)
        run.save(self.name, [model], done=True, epoch=epochs, extra={"distill": recorded})
        return model

    # A method that trains through this loop (resume, hooks, the row) overrides these:
    def settings(self, st):
        """The training settings ``fit`` gets, from the stage's block."""
        return st

    def transform(self, model, ctx):
        """The model to train, made from the one that comes in (not on resumption: the checkpoint holds it)."""
        return model

    def loss_terms(self, model, ctx):
        """What ``fit`` adds to the loss and the gradients (a ``Regularizer``), or None."""
        return build_regularizer(ctx.cfg.regularizer, regularized_groups(model, ctx)) if self.regularized else None

    def row_extras(self, model, ctx) -> dict:
        """Columns the stage adds to its row (and files it writes) once trained."""
        if not self.regularized:
            return {}
        overall, per_layer = sparsity_stats(model)
        ctx.run.write_csv("sparsity.csv", per_layer)
        return {**overall, "removable_channels": removable_channels(model)}


def removable_channels(model) -> int:
    """Channels whose whole filter is exactly zero: removable without changing the producer conv's output."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        return sum(
            int((channel_vectors(model, g, "filter", modules) == 0).all(1).sum())
            for g in model.channel_groups()
            if hasattr(modules[g.conv], "weight") and modules[g.conv].weight.dim() == 4
        )


def finished_row(stage: str, models: list, history: list[dict], epochs: int, ctx) -> dict:
    """The stage's results row; with several networks (a hook's partners), every one's accuracy and the best one
    continues."""
    seconds = sum(h["seconds"] for h in history)
    per_net = [[h for h in history if h.get("net", 0) == k] for k in range(len(models))]
    finals = [(h[-1]["test_acc"], h[-1]["test_loss"]) if h else ctx.test(m) for h, m in zip(per_net, models)]
    best_net = max(range(len(models)), key=lambda k: (finals[k][0], -k))
    top1, loss = finals[best_net]
    best = max((h["test_acc"] for h in per_net[best_net] if h["test_acc"] == h["test_acc"]), default=top1)
    row = ctx.measure(stage, models[best_net], top1, loss, best, epochs, seconds)
    if len(models) > 1:
        row.update({f"top1_net{k}": finals[k][0] for k in range(len(models))}, continued=best_net)
    return row


@STAGES.register("pretrain")
class Pretrain(TrainStage):
    """Trains the dense network."""

    dense_only = True


@STAGES.register("sparse_train")
class SparseTrain(TrainStage):
    """Trains with the configured regularizer added to the loss."""

    dense_only = True
    regularized = True
    reads = ("regularizer",)


@STAGES.register("finetune")
class Finetune(TrainStage):
    """Keeps the surviving weights and trains on."""

    copy_partners = True


@STAGES.register("scratch")
class Scratch(TrainStage):
    """Re-initialises the pruned architecture and trains it (Liu et al. 2019, Scratch-E / Scratch-B)."""

    fresh_init = True
