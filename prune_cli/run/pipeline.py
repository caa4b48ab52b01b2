"""The hub: check the config, build or load the model, resolve each listed stage by name and run it,
resuming finished and interrupted stages from the run directory, then write the tables.

It names no stage, criterion or model family: those are registered parts (``prune_cli/stages``,
``criteria.py``, ``models/``) that the config names.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from prune_cli.core import distributed
from prune_cli.core.atomic import write_text
from prune_cli.core.checkpoint import load_checkpoint
from prune_cli.core.errors import UserError
from prune_cli.core.trust import trusting
from prune_cli.data import describe
from prune_cli.engine import settings
from prune_cli.models import build_model
from prune_cli.run import tables
from prune_cli.run.config import validate
from prune_cli.run.context import Context
from prune_cli.run.rundir import REQUIRED_KEYS, RunDir
from prune_cli.stages import STAGES


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
    ck = None
    if cfg.init_from is not None:
        ck, model = read_init_from(cfg.init_from, ctx)
    view = model  # build and check every component before any data is read, each on the model it will get
    for stage in stages:
        check_shared_groups(stage, view, cfg)
        view = stage.prepare(ctx, view) or view

    start = 0
    if ck is not None:
        run_.restore(ck)
        start = names.index(ck["stage"]) + 1 if ck["stage"] in names else 0
    else:
        top1, loss = ctx.test(model) if names else (float("nan"), float("nan"))
        run_.rows = [ctx.measure("init", model, top1, loss)]

    tables.write_status(run_dir, "running")
    for stage in stages[start:]:
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
    write_text(Path(run_dir) / "summary.md", summary)
    tables.write_status(run_dir, "done")
    if distributed.is_main():
        print(summary)
    return run_.rows


def check_shared_groups(stage, model, cfg) -> None:
    """A model holding channels several layers share (pruned with ``prune.residual=true``) goes only to stages that
    handle them, and is pruned again only with ``prune.residual=true``."""
    if not any(g.shared for g in model.channel_groups()):
        return
    option = "prune.residual" if cfg.prune.residual else "init_from"
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
