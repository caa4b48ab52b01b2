"""The hub: check the config, build or load the model, resolve each listed stage by name and run it,
resuming finished and interrupted stages from the run directory, then write the tables.

It names no stage, criterion or model family: those are registered parts (``prune_cli/stages``,
``criteria.py``, ``models/``) that the config names.
"""

from __future__ import annotations

from pathlib import Path

from . import report, trainer
from .atomic import write_text
from .config import validate
from .context import Context
from .errors import UserError
from .models import build_model
from .rundir import RunDir, load_checkpoint
from .stages import STAGES


def run(cfg, run_dir: Path) -> list[dict]:
    """Run (or resume) the whole schedule of ``cfg`` in ``run_dir``; returns the results rows."""
    validate(cfg)
    trainer.apply(cfg.trainer)
    run_ = RunDir(cfg, run_dir)
    run_.guard()
    ctx = Context(cfg, run_)
    names = list(cfg.schedule.stages)
    stages = [STAGES.get(name)() for name in names]
    for stage in stages:  # build every component first, so a bad option fails before any training
        stage.prepare(ctx)

    model = ctx.build(seed_salt="init")
    start = 0
    if cfg.init_from is not None:
        ck, model = read_init_from(cfg.init_from, ctx.device)
        run_.restore(ck)
        start = names.index(ck["stage"]) + 1 if ck["stage"] in names else 0
    else:
        top1, loss = ctx.test(model) if names else (float("nan"), float("nan"))
        run_.rows = [ctx.measure("init", model, top1, loss)]

    report.write_status(run_dir, "running")
    for stage in stages[start:]:
        ck = run_.checkpoint(stage.name)
        if ck is not None and ck["done"]:  # finished earlier: take its model and tables
            model = load_model(ck, ctx.device)
            run_.restore(ck)
            continue
        model = stage.run(model, ctx, ck)
        run_.write_tables()
    run_.write_tables()
    summary = report.summary_markdown(run_.rows, report.identity(cfg))
    write_text(Path(run_dir) / "summary.md", summary)
    report.write_status(run_dir, "done")
    print(summary)
    return run_.rows


def read_init_from(path: str, device) -> tuple[dict, object]:
    """The checkpoint ``init_from`` names and its model, or a UserError naming the file."""
    try:
        ck = load_checkpoint(path)
        return ck, load_model(ck, device)
    except UserError:
        raise
    except Exception as e:
        raise UserError("init_from", f"{path} is not a prune_cli checkpoint ({type(e).__name__}: {e})") from None


def load_model(ck: dict, device):
    """Rebuild a checkpoint's model from its arch (widths included) and load its weights."""
    model = build_model(ck["arch"]).to(device)
    model.load_state_dict(ck["state_dict"])
    return model
