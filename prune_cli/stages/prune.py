"""The prune stage: the configured criterion chooses channels, the selection meets ``prune.*``, and the
channels are removed physically; ``prune.steps`` > 1 prunes iteratively with short finetunes between
(distilled as the finetune stage's ``distill`` block says).

Shared with every stage that prunes (``finish_pruning``): surgery, ``scores.csv``, ``layers.csv``,
the test of the pruned model and its checkpoint.
"""

from __future__ import annotations

import time
from functools import partial

from omegaconf import OmegaConf

from prune_cli.core.errors import UserError
from prune_cli.engine import latency
from prune_cli.engine.loop import fit, show_progress
from prune_cli.engine.settings import capped_epochs
from prune_cli.importance.criteria import CRITERIA, build_criterion, channel_vectors
from prune_cli.importance.regularizers import ZERO_THRESHOLD
from prune_cli.models import offers_shared_groups, pruned_groups, with_shared_groups
from prune_cli.models.layers import fold
from prune_cli.stages import distill
from prune_cli.stages.base import STAGES, Stage
from prune_cli.stages.latency import time_pruning
from prune_cli.stages.latency_target import aimed, check_pruned, priced_structure, wanted
from prune_cli.structure.channels import prune_channels, structure
from prune_cli.structure.selection import Budget, matching

# the block whose settings the finetune between iterative steps takes (with prune.step_*), first found
STEP_SETTINGS_FROM = ("finetune", "scratch", "pretrain", "sparse_train")
STEP_DISTILL_FROM = "finetune"  # the block whose distill settings those finetunes take


@STAGES.register("prune")
class Prune(Stage):
    """Scores channels with the criterion, selects them to meet the target, removes them physically."""

    prunes = True
    reads = ("criterion", "prune")
    shared_groups = True
    selects_by_prune = True
    steering: dict = {}  # iterative steps: the selection's reference widths and tolerance (step_target)
    teacher: distill.Teacher | None = None  # iterative steps: the finetune block's teacher, built by prepare

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        CRITERIA.get(cfg["criterion"]["name"]).check_config(cfg)
        check_steps(cfg)

    def prepare(self, ctx, model):
        if ctx.cfg.prune.steps > 1:  # the finetunes between steps distil as the finetune stage does
            self.teacher = distill.prepared_teacher(ctx, STEP_DISTILL_FROM)
        criterion = build_criterion(ctx.cfg.criterion)
        groups = self.groups_of(model, ctx)
        criterion.check_groups(groups)
        check_selection(ctx, groups, self.shared_groups)
        return groups if groups is not model else None  # the stages after it get shared groups

    def groups_of(self, model, ctx):
        """``model`` with the channel groups this run prunes: with ``prune.residual=true``, or ``auto`` on a traced
        network, every group of its traced graph (a network of a built-in family is wrapped as it is, named by its
        traced layers); a stage that prunes one producer's channels only gets the simple groups."""
        residual = ctx.cfg.prune.residual if self.shared_groups else False
        return pruned_groups(model, ctx.input_shape, residual, ctx.cfg.prune.attention)

    def run(self, model, ctx, checkpoint):
        cfg, p = ctx.cfg, ctx.cfg.prune
        tic = time.perf_counter()
        # learned factors (e.g. RMNet's) into the weights: the criteria judge the real network
        model = received = self.groups_of(fold(model), ctx)
        dense_widths = model.widths
        dense_amount = Budget(priced_structure(model, ctx), dense_widths, p.target).total if p.steps > 1 else None
        extra, self.steering = {}, {}
        taught = distill.teaching(self.teacher, ctx, STEP_DISTILL_FROM) if p.steps > 1 else None
        if taught is not None:
            extra.update(taught.columns())
        for step in range(1, p.steps + 1):
            ratio = p.ratio
            if ratio is not None and p.steps > 1:  # cumulative share of the DENSE amount, as a share of the current one
                current = Budget(priced_structure(model, ctx), model.widths, p.target).total
                ratio, tolerance = step_target(p, step, dense_amount, current)
                self.steering = {"dense_widths": dense_widths, "tolerance": tolerance, "fill": step == p.steps}
            if wanted(ctx) and step == p.steps:  # the last step meets the measured latency
                keep, scores, stats = aimed(partial(self.select, model, ctx), model, ctx, ratio, received)
            else:
                keep, scores, stats = self.select(model, ctx, ratio)
            model, compensation = self.compensate(model, keep, ctx)
            extra.update(stats, **compensation)
            if step < p.steps:
                model = self.reshape(prune_channels(model, keep))
                st = step_finetune_settings(cfg)
                ctx.run.histories[f"{self.name}_step{step}"] = fit(
                    [model],
                    ctx.data,
                    st,
                    stage=f"{self.name}_step{step}",
                    epochs=capped_epochs(st.epochs, cfg.trainer),
                    seed=cfg.seed,
                    trainer=cfg.trainer,
                    lr_option="prune.step_lr" if p.step_lr is not None else f"schedule.{step_block(cfg)}.lr",
                    distill=taught.distiller() if taught is not None else None,
                )
        seconds = time.perf_counter() - tic
        return finish_pruning(model, keep, scores, ctx, self.name, seconds, extra, dense_widths, self.reshape, received)

    # A method that prunes through this loop (steps, finetunes between them, the row) overrides these:
    def select(self, model, ctx, ratio: float | None) -> tuple:
        """(keep masks, scores, columns for the row) of one step: here the criterion and the selection."""
        return choose(model, ctx, ratio, **self.steering)

    def compensate(self, model, keep, ctx) -> tuple:
        """(the model to remove the channels from, columns for the row): a stage that adjusts the kept weights
        for the channels about to go (Neuron Merging) overrides it; plain pruning removes them as they are."""
        return model, {}

    def reshape(self, pruned):
        """The pruned model after a method's own structural change of the step (PFP's input gathers)."""
        return pruned


def regularized_groups(model, ctx):
    """``model`` as sparse training regularizes it: with ``regularizer.layers=prunable``, offering the groups the
    run's pruning stage will prune (every group of the traced graph where ``prune.residual`` gives them)."""
    pruning = [STAGES.get(name) for name in ctx.cfg.schedule.stages if STAGES.get(name).prunes]
    if ctx.cfg.regularizer.get("layers") != "prunable" or not pruning or not pruning[0].shared_groups:
        return model
    return pruned_groups(model, ctx.input_shape, ctx.cfg.prune.residual, ctx.cfg.prune.attention)


def kept_share(ratio: float, step: int, steps: int, grid: str) -> float:
    """The share of the dense amount left after ``step`` of ``steps``: equal removals (linear) or equal ratios
    between steps (geometric, PFP's cascade)."""
    return 1 - ratio * step / steps if grid == "linear" else (1 - ratio) ** (step / steps)


def step_target(p, step: int, dense_amount: float, current: float) -> tuple[float, float]:
    """(ratio, tolerance) of one iterative step, as shares of the CURRENT amount: the cumulative share of the
    dense amount ``kept_share`` leaves after ``step``, with the error ``prune.tolerance`` allows on that share of
    the dense amount (relative to the whole ratio, not to the step's small part of it, so steps end within
    tolerance of the target). A step that has nothing left to remove asks for almost nothing (it removes none)."""
    removed_by_now = 1 - kept_share(p.ratio, step, p.steps, p.step_grid)
    ratio = max(1 - dense_amount * (1 - removed_by_now) / current, 1e-9)
    return ratio, p.tolerance * removed_by_now * dense_amount / (current * ratio)


def check_steps(cfg: dict) -> None:
    if cfg["prune"]["steps"] > 1 and not any(s in cfg["schedule"] for s in STEP_SETTINGS_FROM):
        raise UserError(
            "prune.steps",
            "iterative steps finetune with a training stage's settings; the schedule has no training block",
        )


def check_selection(ctx, model, shared_groups: bool = False) -> None:
    """Refuse ``prune.*`` settings that can do nothing on this model: patterns that match no layer, a
    ``min_channels`` above a layer's width, a ratio that no selection can reach (naming ``prune.residual`` when
    every group of the traced graph would reach it and the stage can prune them: ``shared_groups``)."""
    p = ctx.cfg.prune
    names, widths = [g.name for g in model.channel_groups()], model.widths
    for option, patterns in (("prune.skip", list(p.skip)), ("prune.layer_ratios", list(p.layer_ratios))):
        for pattern in patterns:
            if not matching(names, [pattern]):
                raise UserError(
                    option, f"{pattern!r} matches no layer of {model.arch['name']} (its layers: {', '.join(names)})"
                )
    narrow = [(n, w) for n, w in zip(names, widths) if w < p.min_channels]
    if narrow:
        raise UserError(
            "prune.min_channels", f"{p.min_channels} is above the width of {narrow[0][0]} ({narrow[0][1]} channels)"
        )
    if p.ratio is None or p.layer_ratios or p.target == "latency":
        return  # a latency out of reach is known once measured: the stage prunes to the fastest reachable, says so
    most = most_removable(ctx, model)
    if most >= p.ratio * (1 - p.tolerance):
        return
    why = f"{p.ratio} of the {p.target} cannot be removed: with prune.min_channels, skip and protect_last as set "
    if not shared_groups or any(g.shared for g in model.channel_groups()) or offers_shared_groups(model, p.residual):
        raise UserError("prune.ratio", f"{why}at most {most:.4f} can go")
    every = most_removable(ctx, with_shared_groups(model, ctx.input_shape, ctx.cfg.prune.attention))
    offer = "would reach it" if every >= p.ratio * (1 - p.tolerance) else "would not reach it either"
    raise UserError(
        "prune.ratio",
        f"{why}at most {most:.4f} can go with the groups of prune.residual={str(p.residual).lower()}; "
        f"prune.residual=true offers every group of the traced graph (at most {every:.4f}: {offer})",
    )


def most_removable(ctx, model) -> float:
    """The largest share of ``prune.target`` any selection can remove from ``model``'s groups under
    ``prune.min_channels``, ``skip`` and ``protect_last``."""
    p = ctx.cfg.prune
    names, widths = [g.name for g in model.channel_groups()], model.widths
    protect = matching(names, p.skip) | (model.last_groups() if p.protect_last else set())
    least = [w if g in protect else p.min_channels for g, w in enumerate(widths)]
    return Budget(structure(model, ctx.input_shape), widths, p.target).removed(least)


def step_block(cfg) -> str:
    return next(s for s in STEP_SETTINGS_FROM if s in cfg.schedule)


def step_finetune_settings(cfg):
    """Iterative pruning's finetune: the schedule's finetune (or first training) block, with prune.step_* (a null
    step_epochs keeps the block's epochs, a null step_lr its lr and lr schedule)."""
    base = cfg.schedule[step_block(cfg)]
    p, changes = cfg.prune, {}  # the block's training hooks stay off: Prune.run gives the finetune's fit none
    if p.step_epochs is not None:
        changes["epochs"] = p.step_epochs
    if p.step_lr is not None:
        changes.update(lr=p.step_lr, lr_schedule="constant")
    return OmegaConf.merge(base, changes)


def choose(model, ctx, ratio: float | None, dense_widths=None, tolerance: float | None = None, fill: bool = True):
    """Keep masks, the scores behind them and the selection's statistics for one pruning step (iterative steps:
    ``dense_widths``, ``tolerance`` from ``step_target`` and ``fill`` on the last step only steer the selection)."""
    cfg, p = ctx.cfg, ctx.cfg.prune
    model.eval()
    groups = model.channel_groups()
    protect = matching([g.name for g in groups], p.skip)
    if p.protect_last:
        protect |= model.last_groups()
    criterion = build_criterion(cfg.criterion)
    sample = ctx.sample(criterion.sample_size) if criterion.needs_data else None
    prune = OmegaConf.to_container(p, resolve=True)
    if dense_widths is not None:
        prune["dense_widths"] = list(dense_widths)
    if tolerance is not None:
        prune["tolerance"] = tolerance
    prune["fill"] = fill
    return criterion.choose(
        model,
        priced_structure(model, ctx),
        sample,
        prune,
        ratio,
        protect,
        progress=show_progress(cfg.trainer.progress),
    )


def finish_pruning(
    model,
    keep,
    scores,
    ctx,
    stage: str,
    seconds: float,
    extra: dict | None = None,
    dense_widths: list[int] | None = None,
    reshape=None,
    received=None,
):
    """Remove the channels physically (then ``reshape(pruned)`` when given: a method's own structural change),
    write scores.csv / layers.csv, test, time the dense and the pruned model (``latency: on``: their rows get the
    latency columns, the pruned row the speed-ups; ``prune.target=latency``: the pruned network against the target
    and the prediction, ``received`` the network the stage received), and checkpoint the stage."""
    run = ctx.run
    groups = model.channel_groups()
    pruned = prune_channels(model, keep)
    if reshape is not None:
        pruned = reshape(pruned)
    run.write_csv(
        "scores.csv",
        [
            {"layer": g.name, "channel": c, "score": float(s[c]), "kept": bool(k[c])}
            for g, s, k in zip(groups, scores, keep)
            for c in range(len(s))
        ],
    )
    run.write_csv(
        "layers.csv",
        [
            {"layer": g.name, "before": before, "after": int(k.sum()), **zero_groups(model, g)}
            for g, k, before in zip(groups, keep, dense_widths or [len(k) for k in keep])
        ],
    )
    top1, loss = ctx.test(pruned)
    run.rows.append({**ctx.measure(stage, pruned, top1, loss, top1, 0, seconds), **(extra or {})})
    if latency.enabled(ctx.cfg):
        time_pruning(ctx, model, pruned)
    if wanted(ctx) and received is not None:
        run.rows[-1].update(check_pruned(ctx, received, pruned))
    run.save(stage, [pruned], done=True, extra={"keep": keep})
    return pruned


def zero_groups(model, group) -> dict:
    """Share of the group's channels whose filter / feature-wise group (all consumers' W[:, c]) is zero (< 1e-3)."""
    modules = dict(model.named_modules())
    filters = channel_vectors(model, group, "filter", modules).detach().norm(dim=1)
    out = {"zero_filters": float((filters < ZERO_THRESHOLD).float().mean()), "zero_feature_groups": float("nan")}
    if group.consumers:  # residual-branch outputs have none: they are added into the stream
        features = channel_vectors(model, group, "feature", modules).detach().norm(dim=1)
        out["zero_feature_groups"] = float((features < ZERO_THRESHOLD).float().mean())
    return out
