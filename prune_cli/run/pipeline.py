"""The hub: check the config, build or load the model, resolve each listed stage by name and run it,
resuming finished and interrupted stages from the run directory, then write the tables.

It names no stage, criterion or model family: those are registered parts (``prune_cli/stages``,
``criteria.py``, ``models/``) that the config names.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prune_cli.core import distributed
from prune_cli.core.atomic import write_text
from prune_cli.core.checkpoint import load_checkpoint
from prune_cli.core.errors import UserError
from prune_cli.core.trust import trusting
from prune_cli.data import describe
from prune_cli.engine import settings
from prune_cli.models import build_model
from prune_cli.run import tables
from prune_cli.run.config import resolve, validate
from prune_cli.run.context import Context
from prune_cli.run.rundir import REQUIRED_KEYS, RunDir
from prune_cli.stages import STAGES, pruning_stages


def run(cfg, run_dir: Path) -> list[dict]:
    """Run (or resume) the whole schedule of ``cfg`` in ``run_dir``; returns the results rows. ``cfg`` is left as
    given (the run settles some options, e.g. ``trainer.memory_format: auto``, on its own copy). The factory target
    the config names (``model.target``) is the user's own: the run may import it, and nothing else a file names."""
    with trusting([cfg.model.get("target")]):
        return _run(copy.deepcopy(cfg), run_dir)


def _run(cfg, run_dir: Path) -> list[dict]:
    run_ = RunDir(cfg, run_dir)
    run_.claim()  # before anything else: a directory another run owns or holds is never written
    validate(cfg)
    settings.apply(cfg.trainer)
    ctx = Context(cfg, run_)
    run_.record_provenance(ctx.device)
    names = list(cfg.schedule.stages)
    stages = [STAGES.get(name)() for name in names]
    model = ctx.build(seed_salt="init")
    ck, start = None, 0
    if cfg.init_from is not None:
        ck, model = read_init_from(cfg.init_from, ctx)
        start = init_from_start(cfg.init_from, ck, stages)
    view = model  # build and check every component before any data is read, each on the model it will get
    for stage in stages:
        check_shared_groups(stage, view, cfg)
        view = stage.prepare(ctx, view) or view
    if ck is not None:
        check_init_from_identity(cfg.init_from, ck, cfg)  # after the checks above: theirs name the cause first
    run_.start_logging()  # after every check: a run they refuse leaves no run in a tracking store
    with run_.tracked():
        return run_stages(ctx, stages[start:], model, ck)


def run_stages(ctx: Context, stages: list, model, init_ck: dict | None) -> list[dict]:
    """Run ``stages`` on ``model`` (``init_ck``: the checkpoint init_from names, whose tables the run takes), each
    taken from its checkpoint when finished earlier; write the tables and the summary; the rows."""
    cfg, run_ = ctx.cfg, ctx.run
    if init_ck is not None:
        run_.restore(init_ck)
    else:
        top1, loss = ctx.test(model) if stages else (float("nan"), float("nan"))
        run_.rows = [ctx.measure("init", model, top1, loss)]

    tables.write_status(run_.dir, "running")
    for stage in stages:
        distributed.barrier()  # every rank reads the checkpoints rank 0 has written so far
        ck = run_.checkpoint(stage.name)
        if ck is not None and ck["done"]:  # finished earlier: take its model and tables
            model = load_model(ck, ctx.device)
            run_.restore(ck)
            continue
        model = stage.run(model, ctx, ck)
        run_.write_tables()
    run_.write_tables()
    summary = tables.summary_markdown(run_.rows, tables.identity(cfg))
    write_text(run_.dir / "summary.md", summary)
    tables.write_status(run_.dir, "done")
    if distributed.is_main():
        print(summary)
    return run_.rows


def check_shared_groups(stage, model, cfg) -> None:
    """A model holding channels several layers share (pruned with ``prune.residual=true``) goes only to stages that
    handle them, and is pruned again only with ``prune.residual=true``."""
    if not any(g.shared for g in model.channel_groups()):
        return
    option = "prune.residual" if cfg.prune.residual is True else "init_from"
    if not stage.shared_groups:
        raise UserError(
            option,
            f"the {stage.name} stage prunes only channels one layer produces; the model holds "
            "channels several layers share (pruned with prune.residual=true)",
        )
    if "prune" in stage.reads and not cfg.prune.residual:
        raise UserError(
            "prune.residual",
            "the model holds channels several layers share (pruned with "
            "prune.residual=true): set prune.residual=true to prune it again",
        )


def read_init_from(path: str, ctx: Context) -> tuple[dict, object]:
    """The checkpoint ``init_from`` names and its model, refused in one line when it is unreadable,
    unfinished, of another model or data than this run's, or does not rebuild."""
    try:
        ck = load_checkpoint(path)
    except UserError:
        raise
    except Exception as e:
        raise UserError("init_from", f"{path} is not a prune_cli checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(ck, dict) and ck and all(isinstance(v, torch.Tensor) for v in ck.values()):
        raise UserError(
            "init_from",
            f"{path} holds a plain state_dict (tensors by name, no architecture); init_from takes a checkpoint "
            "prune_cli wrote: a run's checkpoints/<stage>.pt",
        )
    missing = [k for k in REQUIRED_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise UserError("init_from", f"{path} is not a prune_cli checkpoint (no {', '.join(missing)})")
    if not ck.get("done"):
        raise UserError(
            "init_from",
            f"{path} is unfinished (its {ck.get('stage')} stage stopped after epoch {ck.get('epoch')}): "
            "resume that run first, or start from a finished stage's checkpoint",
        )
    for what, theirs, ours in init_from_identity(ck, ctx):
        if theirs != ours:
            raise UserError("init_from", f"{path} holds {what} {theirs}; this run has {ours}")
    try:
        return ck, load_model(ck, ctx.device)
    except Exception as e:
        raise UserError("init_from", f"{path} does not rebuild ({type(e).__name__}: {e})") from None


def init_from_start(path: str, ck: dict, stages: list) -> int:
    """The first stage of the schedule to run on the checkpoint ``init_from`` names (docs/configuration.md).

    After the checkpoint's stage when the schedule lists it; else, for a pruned checkpoint (a stage that prunes is
    among its rows), after the schedule's first pruning stage (from its start if it has none); else after the last
    stage of the schedule the checkpoint has been through (its rows). Refused in one line when that would run a stage
    the checkpoint has been through again (a duplicate row), train a pruned network in a stage that trains the
    network before pruning (``Stage.dense_only``: the pruned network saved under a dense stage's name), or leave
    nothing to run of a schedule that lacks the checkpoint's stage."""
    names = [stage.name for stage in stages]
    history = [row["stage"] for row in ck["rows"]]
    pruned_by = next((name for name in history if name in pruning_stages()), None)
    if ck["stage"] in names:
        start = names.index(ck["stage"]) + 1
    elif pruned_by is not None:
        first_pruning = next((i for i, stage in enumerate(stages) if stage.prunes), None)
        start = 0 if first_pruning is None else first_pruning + 1
    else:
        start = max((i + 1 for i, name in enumerate(names) if name in history), default=0)
    refuse_init_from_start(path, ck, stages, start, pruned_by)
    return start


def refuse_init_from_start(path: str, ck: dict, stages: list, start: int, pruned_by: str | None) -> None:
    """One line naming init_from and the schedule's stages when starting at ``start`` breaks a rule above."""
    names = [stage.name for stage in stages]
    history = [row["stage"] for row in ck["rows"]]
    schedule = f"the schedule [{', '.join(names)}]"
    again = [name for name in names[start:] if name in history]
    if again:
        raise UserError(
            "init_from",
            f"{path} has been through {', '.join(again)} already (its rows hold them): {schedule} would run them "
            f"again; list only the stages after its {ck['stage']} stage",
        )
    dense = [stage.name for stage in stages[start:] if stage.dense_only]
    if pruned_by is not None and dense:
        raise UserError(
            "init_from",
            f"{path} holds a network its {pruned_by} stage pruned, and {', '.join(dense)} of {schedule} trains the "
            "network before pruning; start from a checkpoint made before pruning, or list only stages that follow it",
        )
    if names and start == len(names) and ck["stage"] not in names:
        raise UserError(
            "init_from",
            f"{path} comes from a {ck['stage']} stage {schedule} lacks, and nothing of the schedule is left to run "
            "after the stages its rows hold: start from an earlier checkpoint, or list the stages to run after it",
        )


def check_init_from_identity(path: str, ck: dict, cfg) -> None:
    """Refuse a checkpoint whose stages acted with other settings than the ones this run's table names for them
    (e.g. pruned at ``prune.ratio=0.5`` while the table says 0.3): the rows it brings would be mislabelled."""
    mine = acted(resolve(cfg), list(cfg.schedule.stages))
    try:
        theirs = acted(ck["config"], [row["stage"] for row in ck["rows"] if row["stage"] in STAGES])
    except (OmegaConfBaseException, KeyError, AttributeError, TypeError):  # written without these groups
        return
    differ = [k for k in mine if k in theirs and mine[k] != theirs[k]]
    if differ:
        raise UserError(
            "init_from",
            f"{path} was made with {', '.join(f'{k}={theirs[k]}' for k in differ)}; this run's table would say "
            f"{', '.join(f'{k}={mine[k]}' for k in differ)}: run with the checkpoint's settings, or start from a "
            "checkpoint made before the stages that read them",
        )


def acted(config: dict, stages: list[str]) -> dict:
    """The table's identity columns (``tables.identity``) that ``stages`` read in the plain ``config``: those whose
    value is not the blank a table shows for a group no stage reads."""
    listed, blank = (
        tables.identity(OmegaConf.create({**config, "schedule": {**config["schedule"], "stages": names}}))
        for names in (stages, [])
    )
    return {k: v for k, v in listed.items() if v != blank[k]}


def init_from_identity(ck: dict, ctx: Context) -> list[tuple[str, object, object]]:
    """(what, the checkpoint's, this run's) for what must match: model, input channels, classes, dataset, images."""
    arch, ours = ck["arch"], ctx.arch()
    theirs_data = ck["config"]["dataset"]
    try:
        theirs_shape = describe(theirs_data)[0]
    except UserError:  # its files may live elsewhere: compare what the checkpoint itself says
        theirs_shape = (arch["in_channels"], *ctx.input_shape[1:])
    return [
        ("the model", arch.get("base", arch)["name"], ours["name"]),  # a traced network: the network it wraps
        ("input channels", arch["in_channels"], ours["in_channels"]),
        ("classes", arch["num_classes"], ours["num_classes"]),
        ("the dataset", theirs_data["name"], ctx.cfg.dataset.name),
        ("images of", "x".join(map(str, theirs_shape[1:])), "x".join(map(str, ctx.input_shape[1:]))),
    ]


def load_model(ck: dict, device):
    """Rebuild a checkpoint's model from its arch (widths included) and load its weights."""
    model = build_model(ck["arch"]).to(device)
    model.load_state_dict(ck["state_dict"])
    return model
