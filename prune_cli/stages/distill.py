"""A training stage's ``distill`` block: which teacher it learns from, checked before any data, and its record.

``schedule.<stage>.distill.teacher`` is ``dense`` (the run's model before pruning: the checkpoint of the stage before
the first stage that prunes or re-forms the network, in this run or in the run ``init_from`` comes from), a
prune_cli checkpoint path, or a model block (``{name: torchvision | custom, ..., weights_path: FILE}``, built like
``model=`` with the run's classes and loaded strictly from its weights). A teacher is refused in one line when it
cannot exist (``dense`` before pruning), does not build, or its classes or input do not match the run's. It is not
stored again in the stage's checkpoints: its source and weights digest are, and a resumed stage refuses a teacher
whose weights changed since. The prune stage's steps distil with the finetune stage's block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from prune_cli.core.checkpoint import load_checkpoint, weights_digest
from prune_cli.core.errors import UserError, one_line
from prune_cli.core.options import Float, Option, Section, check_block
from prune_cli.core.trust import trusting
from prune_cli.engine.distill import Distiller
from prune_cli.models import MODELS, build_model
from prune_cli.stages.base import STAGES

DENSE = "dense"
SPEC_FAMILIES = ("torchvision", "custom")  # the model families a teacher block may name (those that load weights)


def teacher_rule(value) -> str | None:
    """Why ``value`` is not a teacher: ``dense``, a path, or a model block of a family that loads local weights."""
    if isinstance(value, str):
        return None if value else "must be dense, a checkpoint path or a model block; got an empty string"
    if not isinstance(value, dict):
        return f"must be dense, a checkpoint path or a model block {{name: torchvision | custom, ...}}; got {value!r}"
    if value.get("name") not in SPEC_FAMILIES:
        return f"a model block names its family: name: torchvision or custom; got name: {value.get('name')!r}"
    if not value.get("weights_path"):
        return "a model block needs weights_path: the teacher's trained weights (a random teacher teaches nothing)"
    return None


BLOCK = Section(
    "distill",
    (
        Float(
            "alpha",
            0.0,
            "weight of the teacher: loss = (1 - alpha) CE + alpha T^2 KL(teacher || student); 0 = off",
            lo=0.0,
            hi=1.0,
        ),
        Float(
            "temperature", 4.0, "temperature T softening both networks' outputs in the KL term", lo=0.0, lo_open=True
        ),
        Option(
            "teacher",
            "any",
            DENSE,
            "dense: the run's model before pruning | a prune_cli checkpoint | a model block with weights_path",
            rule=teacher_rule,
            rule_doc="dense, a checkpoint path, or a model block {name: torchvision | custom, ..., weights_path: FILE}",
        ),
    ),
    "knowledge distillation from a teacher network (Hinton et al. 2015); alpha 0 = off",
    absent={"alpha": 0.0, "temperature": 4.0, "teacher": DENSE},
)


@dataclass
class Teacher:
    """A built teacher: the network, where it came from and its weights' sha256."""

    net: torch.nn.Module
    source: str
    digest: str


def settings(block) -> dict | None:
    """The distill block as a plain dict, or None when it is off (absent, or alpha 0)."""
    if block is None:
        return None
    plain = OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else dict(block)
    return plain if plain.get("alpha", 0.0) > 0 else None


def check_config(cfg: dict, stage: str) -> None:
    """Refuse ``teacher: dense`` in a stage that trains before the schedule's first pruning stage (no dense model
    exists yet to learn from)."""
    block = settings(cfg["schedule"].get(stage, {}).get("distill"))
    if block is None or block["teacher"] != DENSE:
        return
    names = list(cfg["schedule"]["stages"])
    first = first_changing(names)
    if stage in names and first is not None and names.index(stage) < first:
        raise UserError(
            f"schedule.{stage}.distill.teacher",
            f"the {stage} stage trains before {names[first]}, when the run has no dense model to learn from: name "
            "a teacher (a checkpoint path, or a model block with weights_path)",
        )


def first_changing(names: list[str]) -> int | None:
    """The index of the first stage that prunes or re-forms the network (what ends the dense model), or None."""
    changing = {name for name, stage in STAGES.items() if stage.prunes or stage.reforms}
    return next((i for i, name in enumerate(names) if name in changing), None)


def dense_path(ctx, stage: str) -> Path:
    """The checkpoint holding the run's dense model, for ``stage`` (the stage the teacher serves): that of the stage
    before the first that prunes, trained in this run or the ``init_from`` checkpoint that has been through it; for
    a run that starts from a pruned checkpoint, the dense model of the run it came from, beside it."""
    names, option = list(ctx.cfg.schedule.stages), f"schedule.{stage}.distill.teacher"
    first, init_from = first_changing(names), ctx.cfg.get("init_from")
    history = [r["stage"] for r in load_checkpoint(init_from, mapped=True)["rows"]] if init_from else []
    ended = first_changing(history)
    if ended is not None:  # init_from was pruned: its run's dense model, beside it
        before = history[ended - 1] if ended > 0 else "init"
        path = Path(init_from).parent / f"{before}.pt"
        if before == "init" or not path.is_file():
            why = f"the dense model of init_from {init_from} (its {before} stage) is not on record beside it"
            raise UserError(option, f"{why}: name a teacher")
        return path
    if first is None:
        raise UserError(option, "nothing in this run or in its init_from is pruned: name a teacher")
    if first > 0 and names[first - 1] not in history:  # trained in this run
        return ctx.run.ckpt_dir / f"{names[first - 1]}.pt"
    if init_from is None:
        raise UserError(
            option,
            f"the schedule starts with {names[0]} and init_from is null: the run has no trained dense model to learn "
            "from; name a teacher, or start from a trained checkpoint",
        )
    return Path(init_from)  # the dense model this run prunes


def build_teacher(ctx, stage: str, teacher) -> Teacher:
    """The teacher ``teacher`` names for ``stage``, on the run's device, checked against the run's classes and input."""
    option = f"schedule.{stage}.distill.teacher"
    if isinstance(teacher, str):
        path = dense_path(ctx, stage) if teacher == DENSE else Path(teacher)
        net = from_checkpoint(path, option)
        source = str(path) if teacher != DENSE else f"dense {shown(path, ctx.run.dir)}"
    else:
        net, source = from_block(dict(teacher), ctx, option), f"{teacher['name']} {teacher['weights_path']}"
    net = net.to(ctx.device).eval().requires_grad_(False)
    check_fits(net, ctx, option, source)
    return Teacher(net, source, weights_digest(net.state_dict()))


def shown(path: Path, run_dir: Path) -> str:
    """``path`` as the tables show it: relative to the run directory when inside it (runs of one config in
    different directories name their dense teachers alike)."""
    try:
        return str(Path(path).relative_to(run_dir))
    except ValueError:
        return str(path)


def from_checkpoint(path: Path, option: str):
    """A prune_cli checkpoint's network (read as data; a factory target it names follows the trust rule)."""
    if not path.is_file():
        raise UserError(option, f"{path} does not exist")
    try:
        ck = load_checkpoint(path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(option, f"{path} is not a prune_cli checkpoint ({one_line(e)})") from None
    if not isinstance(ck, dict) or not {"arch", "state_dict"} <= set(ck):
        raise UserError(
            option,
            f"{path} is not a prune_cli checkpoint (a plain state_dict has no architecture: give it as a model block "
            "{name: torchvision | custom, ..., weights_path: FILE})",
        )
    try:
        net = build_model(ck["arch"])
        net.load_state_dict(ck["state_dict"])
    except UserError as e:
        raise UserError(option, f"{path}: {e.why}") from None
    except Exception as e:
        raise UserError(option, f"{path} does not rebuild ({one_line(e)})") from None
    return net


def from_block(block: dict, ctx, option: str):
    """A ``model=``-style block's network with the run's classes, its weights loaded strictly (a classifier of
    other classes is refused, not replaced); its factory target is the user's own naming, so it is trusted."""
    name = block.pop("name")
    checked = check_block(block, MODELS.get(name).options_for(name), option)
    path = checked.pop("weights_path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(option, f"cannot read {path} ({one_line(e)})") from None
    try:
        with trusting([checked.get("target")]):
            net = build_model({**ctx.arch({"name": name, **checked}), "weights_path": None})
        net.net.load_state_dict(state)
    except UserError as e:
        raise UserError(option, e.why) from None
    except Exception as e:
        why = f"{path} does not fit the network with this run's {ctx.num_classes} classes ({one_line(e)})"
        raise UserError(option, why) from None
    return net


def check_fits(net, ctx, option: str, source: str) -> None:
    """Refuse a teacher that does not take the run's images or does not give one output per class."""
    shape = "x".join(map(str, ctx.input_shape))
    try:
        with torch.inference_mode():
            out = net(torch.zeros(2, *ctx.input_shape, device=ctx.device))
    except Exception as e:
        why = f"the teacher {source} does not take this run's {shape} images ({one_line(e)})"
        raise UserError(option, why) from None
    if tuple(out.shape) != (2, ctx.num_classes):
        classes = out.shape[1] if out.dim() == 2 else tuple(out.shape[1:])
        raise UserError(option, f"the teacher {source} gives {classes} classes; this run has {ctx.num_classes}")


def prepared_teacher(ctx, stage: str) -> Teacher | None:
    """The teacher of ``stage``'s distill block, built and checked before any data is read (``dense``: only checked
    to exist; its checkpoint may be one an earlier stage of this run writes), or None."""
    block = settings(ctx.cfg.schedule.get(stage, {}).get("distill"))
    if block is None:
        return None
    if block["teacher"] == DENSE:
        dense_path(ctx, stage)
        return None
    return shared_teacher(ctx, stage, block["teacher"])


def shared_teacher(ctx, stage: str, teacher) -> Teacher:
    """``build_teacher``, once per run for each stage block and teacher (the prune stage's step finetunes and the
    finetune stage share the finetune block's)."""
    key = (stage, repr(teacher))
    if key not in ctx.teachers:
        ctx.teachers[key] = build_teacher(ctx, stage, teacher)
    return ctx.teachers[key]


@dataclass
class Teaching:
    """A stage's distillation: its teacher and the settings of its block."""

    teacher: Teacher
    alpha: float
    temperature: float

    def distiller(self) -> Distiller:
        """What ``fit`` distils with."""
        return Distiller(self.teacher.net, self.alpha, self.temperature)

    def columns(self) -> dict:
        """The distill columns of the stage's results row (also what its checkpoints record of the teacher)."""
        return {
            "distill_alpha": self.alpha,
            "distill_temperature": self.temperature,
            "distill_teacher": self.teacher.source,
            "distill_teacher_sha256": self.teacher.digest,
        }

    def check_same(self, recorded: dict | None, stage: str) -> None:
        """A resumed stage learns from the teacher it started with: refuse one whose weights changed since
        (``recorded``: the columns its checkpoint holds)."""
        then, now = (recorded or {}).get("distill_teacher_sha256"), self.teacher.digest
        if then not in (None, now):
            raise UserError(
                f"schedule.{stage}.distill.teacher",
                f"the teacher {self.teacher.source} changed since the {stage} stage started (sha256 {then[:12]} "
                f"then, {now[:12]} now): restore it, or start a new run",
            )


def teaching(prepared: Teacher | None, ctx, stage: str) -> Teaching | None:
    """How ``stage`` distils: with the teacher ``prepared_teacher`` built, else the dense model; None when its block
    leaves distillation off."""
    block = settings(ctx.cfg.schedule.get(stage, {}).get("distill"))
    if block is None:
        return None
    teacher = prepared if prepared is not None else shared_teacher(ctx, stage, DENSE)
    return Teaching(teacher, block["alpha"], block["temperature"])
