"""Checks every value of a composed config before anything runs; a bad one is a UserError naming the option.

Hydra itself rejects unknown keys and choices; this module rejects bad values.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import UserError
from .models import MODEL_NAMES

STAGES = ("pretrain", "sparse_train", "prune", "gates", "finetune", "scratch")
TRAIN_STAGES = ("pretrain", "sparse_train", "finetune", "scratch")


def check(ok: bool, option: str, why: str) -> None:
    if not ok:
        raise UserError(option, why)


def one_of(value, choices, option: str) -> None:
    check(value in choices, option, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


def positive_int(value, option: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    check(ok, option, f"must be an integer {'>= 0' if allow_zero else '> 0'}; got {value!r}")


def positive(value, option: str) -> None:
    check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, option,
          f"must be a number > 0; got {value!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check(bool(re.fullmatch(r"cpu|mps|cuda(:\d+)?", str(name))), "trainer.device",
          f"must be auto, cpu, cuda, cuda:N or mps; got {name!r}")
    if name.startswith("cuda"):
        check(torch.cuda.is_available(), "trainer.device", "CUDA is not available on this machine; use trainer.device=cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        check(index < torch.cuda.device_count(), "trainer.device",
              f"{name} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    if name == "mps":
        check(torch.backends.mps.is_available(), "trainer.device", "MPS is not available on this machine")
    return torch.device(name)


def validate(cfg) -> None:
    positive_int(cfg.seed, "seed", allow_zero=True)
    t = cfg.trainer
    resolve_device(t.device)
    one_of(t.precision, ("fp32", "bf16", "fp16"), "trainer.precision")
    check(t.precision != "fp16" or str(t.device).startswith("cuda") or (t.device == "auto" and torch.cuda.is_available()),
          "trainer.precision", "fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    positive_int(t.batch_size, "trainer.batch_size")
    positive_int(t.eval_batch_size, "trainer.eval_batch_size")
    positive_int(t.threads, "trainer.threads", allow_zero=True)
    positive_int(t.eval_every, "trainer.eval_every")
    if t.max_epochs is not None:
        positive_int(t.max_epochs, "trainer.max_epochs")
    one_of(t.progress, ("auto", True, False), "trainer.progress")

    m = cfg.model
    one_of(m.name, MODEL_NAMES, "model.name")
    positive(m.width_mult, "model.width_mult")
    if "shortcut" in m:
        one_of(m.shortcut, ("A", "B"), "model.shortcut")
    if "head" in m:
        one_of(m.head, ("linear", "li"), "model.head")
    if "stem" in m:
        one_of(m.stem, ("cifar", "imagenet"), "model.stem")

    p = cfg.prune
    one_of(p.target, ("channels", "params", "macs"), "prune.target")
    if p.ratio is not None:
        check(isinstance(p.ratio, (int, float)) and 0 < p.ratio < 1, "prune.ratio", f"must be in (0, 1); got {p.ratio!r}")
    one_of(p.scope, ("global", "layer"), "prune.scope")
    one_of(p.granularity, (None, "filter", "feature"), "prune.granularity")
    one_of(p.normalize, ("none", "max", "l2", "mean"), "prune.normalize")
    positive_int(p.min_channels, "prune.min_channels")
    positive(p.tolerance, "prune.tolerance")
    positive_int(p.steps, "prune.steps")
    positive_int(p.step_epochs, "prune.step_epochs", allow_zero=True)
    positive(p.step_lr, "prune.step_lr")
    check(p.steps == 1 or not p.layer_ratios, "prune.steps", "iterative steps need prune.ratio, not prune.layer_ratios")
    for pattern, r in (p.layer_ratios or {}).items():
        check(isinstance(r, (int, float)) and 0 <= r < 1, f"prune.layer_ratios.{pattern}", f"must be in [0, 1); got {r!r}")

    stages = list(cfg.schedule.stages)
    for name in stages:
        one_of(name, STAGES, "schedule.stages")
    check(len(set(stages)) == len(stages), "schedule.stages", f"a stage appears twice: {stages}")
    for name in stages:
        if name in TRAIN_STAGES or name == "gates":
            check(name in cfg.schedule, f"schedule.{name}", "the stage is listed but has no settings block")
        if name in TRAIN_STAGES:
            validate_stage(cfg.schedule[name], f"schedule.{name}")
    check(not ({"prune", "gates"} <= set(stages)), "schedule.stages", "gates already prunes; list prune or gates, not both")
    if "gates" in stages:
        validate_gates(cfg.schedule.gates, cfg)
    if cfg.init_from is not None:
        check(Path(cfg.init_from).is_file(), "init_from", f"no checkpoint file at {cfg.init_from}")


def validate_stage(st, prefix: str) -> None:
    positive_int(st.epochs, f"{prefix}.epochs", allow_zero=True)
    one_of(st.optimizer, ("sgd", "adam"), f"{prefix}.optimizer")
    positive(st.lr, f"{prefix}.lr")
    check(0 <= st.momentum < 1, f"{prefix}.momentum", f"must be in [0, 1); got {st.momentum!r}")
    check(st.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0; got {st.weight_decay!r}")
    one_of(st.lr_schedule, ("multistep", "step", "cosine", "constant"), f"{prefix}.lr_schedule")
    check(all(0 < m <= 1 for m in st.milestones), f"{prefix}.milestones",
          f"must be fractions of the epochs in (0, 1]; got {list(st.milestones)}")
    check(0 < st.step_size <= 1, f"{prefix}.step_size", f"must be a fraction of the epochs in (0, 1]; got {st.step_size!r}")
    positive(st.gamma, f"{prefix}.gamma")
    positive_int(st.batch_size, f"{prefix}.batch_size")
    one_of(st.budget, ("E", "B"), f"{prefix}.budget")
    g = st.graft
    one_of(g.variant, ("none", "external", "noise", "internal"), f"{prefix}.graft.variant")
    if g.variant == "external":
        check(isinstance(g.networks, int) and g.networks >= 2, f"{prefix}.graft.networks",
              f"external grafting needs at least 2 networks; got {g.networks!r}")
    one_of(g.lr_schedules, ("stage", "slr", "dlr"), f"{prefix}.graft.lr_schedules")
    one_of(g.scope, ("all", "conv_bn", "conv"), f"{prefix}.graft.scope")
    check(0 < g.internal_share <= 0.5, f"{prefix}.graft.internal_share", f"must be in (0, 0.5]; got {g.internal_share!r}")


def validate_gates(st, cfg) -> None:
    positive_int(st.epochs, "schedule.gates.epochs")
    positive(st.lr, "schedule.gates.lr")
    positive(st.lam, "schedule.gates.lam")
    check(0 < st.density < 1, "schedule.gates.density", f"must be in (0, 1); got {st.density!r}")
    one_of(st.density_key, ("density", "nonzero"), "schedule.gates.density_key")
    positive_int(st.batch_size, "schedule.gates.batch_size")
    check(cfg.prune.target == "macs", "prune.target", "the gates stage meets a MACs reduction; set prune.target=macs")
    check(cfg.prune.ratio is not None, "prune.ratio", "the gates stage needs the MACs reduction to reach, in (0, 1)")
    check(bool(cfg.dataset.val_split), "dataset.val_split",
          "the gates stage keeps the best-validation epoch; hold out a validation split (PFS: 5000)")
