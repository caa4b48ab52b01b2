"""The training stages: pretrain, sparse_train, finetune and scratch share one implementation.

Their differences are declared as class attributes: ``regularized`` (the configured regularizer is
added to the loss), ``fresh_init`` (the pruned architecture is re-initialised, Liu et al. 2019; with
``budget: B`` its epochs scale by MACs_dense / MACs_pruned) and ``copy_partners`` (external grafting's
other networks start as copies of the model rather than fresh initialisations).
"""

from __future__ import annotations

import copy

import torch

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool, Choice, Float, Int, List, Section, Value
from prune_cli.core.seeds import derived
from prune_cli.engine.loop import fit
from prune_cli.engine.settings import capped_epochs
from prune_cli.importance.criteria import channel_vectors
from prune_cli.importance.regularizers import build_regularizer, sparsity_stats
from prune_cli.models import build_model
from prune_cli.stages.base import STAGES, Stage
from prune_cli.structure.counting import count_macs

GRAFT = Section(
    "graft",
    (
        Choice(
            "variant",
            "none",
            ("none", "external", "noise", "internal"),
            "filter grafting: none | external (N networks, ring) | noise | internal",
        ),
        Int("networks", 2, "external: networks trained side by side, each with its own data order", lo=2),
        Choice(
            "lr_schedules",
            "stage",
            ("stage", "slr", "dlr"),
            "stage: every network uses the stage's schedule | slr: shared step | dlr: per-network cosine",
        ),
        Float("A", 0.4, "alpha = (A / pi) * arctan(c * (H_m - H_(m-1))) + 0.5", lo=0.0),
        Float("c", 500.0, "the entropy-difference scale c of alpha", lo=0.0),
        Choice(
            "scope", "all", ("all", "conv_bn", "conv"), "layers grafted: all (conv + linear, with BN) | conv_bn | conv"
        ),
        Float("noise_sigma0", 0.01, "noise: std of the noise at epoch 0 ...", lo=0.0),
        Float("noise_decay", 0.95, "... times decay**epoch", lo=0.0, hi=1.0),
        Float("noise_threshold", 0.1, "noise: filters with L1 norm below this x the layer mean get noise", lo=0.0),
        Float(
            "internal_share",
            0.1,
            "internal: share of each layer's filters overwritten by its highest-entropy ones",
            lo=0.0,
            hi=0.5,
            lo_open=True,
        ),
    ),
    "filter grafting (Meng et al., CVPR 2020); variant none = off",
)

GRDA = Section(
    "grda",
    (
        Float("c", 0.005, "the threshold's scale c (the authors advise 0 < c < 0.005)", lo=0.0),
        Float("mu", 0.51, "the threshold's growth exponent mu (advised: 0.501, 0.51, 0.55)", lo=0.0, lo_open=True),
    ),
    "optimizer=grda (Chao et al., NeurIPS 2020): threshold c * lr^(1/2 + mu) * n^mu; no momentum, no weight decay",
)

OPTIONS = (
    Int("epochs", 30, "epochs of this stage (scratch with budget B scales it)", lo=0),
    Choice("optimizer", "sgd", ("sgd", "adam", "grda"), "the optimizer (grda: see the grda block)"),
    Float("lr", 0.1, "initial learning rate", lo=0.0, lo_open=True),
    Float("momentum", 0.9, "SGD momentum (adam: beta1)", lo=0.0, hi=1.0, hi_open=True),
    Bool("nesterov", False, "SGD Nesterov momentum"),
    Float("weight_decay", 5.0e-4, "L2 weight decay", lo=0.0),
    Choice(
        "lr_schedule",
        "multistep",
        ("multistep", "step", "cosine", "constant", "linear"),
        "the learning-rate schedule (linear: lr until milestones[0], then linearly to lr * gamma at milestones[1])",
    ),
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
    Int("batch_size", 128, "training batch size (default: trainer.batch_size)", lo=1),
    Choice("budget", "E", ("E", "B"), "scratch only: E keeps the epochs; B scales them by MACs_dense / MACs_pruned"),
    GRAFT,
    GRDA,
)


class TrainStage(Stage):
    options = OPTIONS
    shared_groups = True
    regularized = False
    fresh_init = False
    copy_partners = False

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        st = cfg["schedule"][cls.name]
        if st["lr_schedule"] == "linear" and not (
            len(st["milestones"]) == 2 and st["milestones"][0] < st["milestones"][1]
        ):
            raise UserError(
                f"schedule.{cls.name}.milestones",
                f"lr_schedule=linear needs two increasing fractions [start, end] of the ramp; got {st['milestones']}",
            )

    def prepare(self, ctx, model) -> None:
        if self.regularized:  # a regularizer that selects no layer of this model fails now, not after pretraining
            build_regularizer(ctx.cfg.regularizer, copy.deepcopy(model))  # a copy: it may set BN scales

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
        models = [model] + self.grafting_partners(model, st, cfg.seed)
        if checkpoint is not None:
            models = [build_model(checkpoint["arch"]).to(ctx.device) for _ in models]
        # built before a resumed state is loaded: a regularizer may initialise weights (e.g. BN gamma = 0.5)
        regularizer = self.loss_terms(models[0], ctx)
        start, optimizer_states, history = 0, None, []
        if checkpoint is not None:  # an interrupted stage: continue after its last finished epoch
            for m, state in zip(models, checkpoint["states"]):
                m.load_state_dict(state)
            start, optimizer_states = checkpoint["epoch"], checkpoint["optimizers"]
            history = checkpoint["histories"].get(self.name, [])
            run.restore(checkpoint)

        def save_epoch(epoch, optimizers, hist):
            run.histories[self.name] = hist
            run.save(self.name, models, done=False, epoch=epoch, optimizers=optimizers)
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
        )
        run.histories[self.name] = history
        row = finished_row(self.name, models, history, epochs, ctx)
        model = models[row.get("continued", 0)]
        row.update(self.row_extras(model, ctx))
        run.rows.append(row)
        run.save(self.name, [model], done=True, epoch=epochs)
        return model

    # A method that trains through this loop (resume, grafting, the row) overrides these:
    def settings(self, st):
        """The training settings ``fit`` gets, from the stage's block."""
        return st

    def transform(self, model, ctx):
        """The model to train, made from the one that comes in (not on resumption: the checkpoint holds it)."""
        return model

    def loss_terms(self, model, ctx):
        """What ``fit`` adds to the loss and the gradients (a ``Regularizer``), or None."""
        return build_regularizer(ctx.cfg.regularizer, model) if self.regularized else None

    def row_extras(self, model, ctx) -> dict:
        """Columns the stage adds to its row (and files it writes) once trained."""
        if not self.regularized:
            return {}
        overall, per_layer = sparsity_stats(model)
        ctx.run.write_csv("sparsity.csv", per_layer)
        return {**overall, "removable_channels": removable_channels(model)}

    def grafting_partners(self, model, st, seed: int) -> list:
        """The other networks of external grafting: fresh initialisations, or copies when finetuning."""
        if st.graft.variant != "external":
            return []
        partners = []
        for k in range(1, st.graft.networks):
            torch.manual_seed(derived(seed + k, self.name))
            partner = copy.deepcopy(model) if self.copy_partners else build_model(model.arch)
            partners.append(partner.to(next(model.parameters()).device))
        return partners


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
    """The stage's results row; with several grafted networks, every one's accuracy and the best one continues."""
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


@STAGES.register("sparse_train")
class SparseTrain(TrainStage):
    """Trains with the configured regularizer added to the loss."""

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
