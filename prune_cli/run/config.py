"""Checks a whole composed config against the declarations before anything is read or trained.

Each group's block is checked against the options its registered part declares (``model``,
``dataset``, ``regularizer`` and ``criterion`` by their ``name``; ``trainer`` and ``prune`` have one
set each), the schedule's stage names against the stage registry and each stage's block against its
options; then every rule across options (the trainer's, the selection's, each listed stage's).
A bad value is a UserError naming the full option path.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prune_cli.core.errors import UserError
from prune_cli.core.options import (
    ALWAYS,
    Choice,
    Int,
    List,
    Option,
    Section,
    Str,
    Value,
    check_block,
    find,
    markdown_table,
)
from prune_cli.data import DATASETS
from prune_cli.engine import settings
from prune_cli.importance.criteria import CRITERIA
from prune_cli.importance.regularizers import REGULARIZERS
from prune_cli.models import MODELS
from prune_cli.run import (
    mlflow_tracking,  # noqa: F401 (registers the mlflow loggers)
    objective,
)
from prune_cli.run.logger import LOGGERS
from prune_cli.stages import STAGES
from prune_cli.structure import selection

# every generator a seed feeds takes it: torch's (64-bit) after the widest derivation (seeds.epoch_generator,
# seed x 1_000_003 plus the grafting stride) and NumPy's legacy 32-bit seeding
SEED_MAX = 2**32 - 1

RUN_OPTIONS = (
    Int("seed", 0, "seeds model init, data order, augmentation, subsets and data-driven criteria", lo=0, hi=SEED_MAX),
    Str(
        "init_from",
        None,
        "a checkpoints/<stage>.pt to start from; the schedule starts after that stage (docs: How a run is configured)",
        nullable=True,
    ),
    Choice(
        "latency",
        "on",
        ("on", "off", True, False),
        "a run that prunes times the dense and the pruned model on its device (batch 1 and trainer.eval_batch_size): "
        "latency and speed-up columns; off under debug=smoke",
        rule_doc="on or off (true / false)",
        absent="off",
    ),
    objective.OPTION,
)
STAGE_LIST = List("stages", [], "the stages to run, in order", item=Value("str"))


def part_options(group: str, name: str) -> tuple[Option, ...]:
    """The options that the part ``name`` of ``group`` declares (besides ``name``)."""
    if group == "model":
        return MODELS.get(name).options_for(name)
    return NAMED_GROUPS[group].get(name).options


NAMED_GROUPS = {
    "model": MODELS,
    "dataset": DATASETS,
    "regularizer": REGULARIZERS,
    "criterion": CRITERIA,
    "logger": LOGGERS,
}
FIXED_GROUPS = {"trainer": settings.OPTIONS, "prune": selection.OPTIONS}
# a named group's block as a whole, declared where the group came after runs were written (its parts declare the rest)
GROUP_BLOCKS = (Section("logger", (), "experiment tracking: logger.name picks the logger", absent={"name": "none"}),)


def declarations_at(path: str) -> list[Option]:
    """Every declaration of the config ``path`` in any config: in any part of a named group, in any stage."""
    head, _, rest = path.partition(".")
    if not rest:
        found = [find(RUN_OPTIONS + GROUP_BLOCKS, head)]
    elif head in NAMED_GROUPS:
        found = [find(part_options(head, name), rest) for name in NAMED_GROUPS[head].names()]
    elif head in FIXED_GROUPS:
        found = [find(FIXED_GROUPS[head], rest)]
    elif head == "schedule":
        stage, _, rest = rest.partition(".")
        found = [find(STAGES.get(stage).options or (), rest)] if rest and stage in STAGES else []
    else:
        found = []
    return [o for o in found if o is not None]


def absent_value(path: str):
    """What a config written before the option at ``path`` existed means (its declared ``absent``), else ALWAYS."""
    return next((o.absent for o in declarations_at(path) if o.absent is not ALWAYS), ALWAYS)


def declared(cfg: dict) -> dict[str, tuple[Option, ...]]:
    """{config path: the options declared for it} for one composed config (paths of the schedule included)."""
    out = {group: part_options(group, cfg[group].get("name")) for group in NAMED_GROUPS}
    out.update(FIXED_GROUPS)
    for key in cfg["schedule"]:
        if key != "stages":
            out[f"schedule.{key}"] = STAGES.get(key).options or ()
    return out


def resolve(cfg) -> dict:
    """The composed config as a plain dict with every interpolation resolved (or one line saying which fails)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise UserError(getattr(e, "full_key", None) or "config", f"cannot be resolved ({e.msg})") from None


def validate(cfg) -> dict:
    """The composed config as a plain dict, once every option and every rule across options holds."""
    return check_resolved(resolve(cfg))


def check_resolved(plain: dict) -> dict:
    """``plain`` (a resolved config as a plain dict) once every option and every rule across options holds."""
    expected = {o.name for o in RUN_OPTIONS} | set(NAMED_GROUPS) | set(FIXED_GROUPS) | {"schedule"}
    for key in plain:
        if key not in expected:
            raise UserError(key, f"unknown option (valid at the top level: {', '.join(sorted(expected))})")
    check_block({k: plain[k] for k in plain if k in {o.name for o in RUN_OPTIONS}}, RUN_OPTIONS, "", fill=False)
    for group in NAMED_GROUPS:
        block = dict(plain[group])
        name = block.pop("name", None)
        check_block(block, part_options(group, name), group, fill=False)
    for group, options in FIXED_GROUPS.items():
        check_block(plain[group], options, group, fill=False)
    check_schedule(plain["schedule"])

    settings.check_config(plain)
    selection.check_config(plain)
    LOGGERS.get(plain["logger"]["name"]).check_config(plain)
    objective.check_config(plain)
    for name in plain["schedule"]["stages"]:
        STAGES.get(name).check_config(plain)
        check_own_rule(name, plain["prune"])
        if (
            plain["prune"]["residual"] is True
            and "prune" in STAGES.get(name).reads
            and not STAGES.get(name).shared_groups
        ):
            raise UserError("prune.residual", f"the {name} stage prunes only channels one layer produces")
    if plain["init_from"] is not None and not Path(plain["init_from"]).is_file():
        raise UserError("init_from", f"no checkpoint file at {plain['init_from']}")
    return plain


def check_own_rule(name: str, prune: dict) -> None:
    """Refuse the selection engine's latency target and ``round_to`` for a pruning stage that selects by a rule of
    its own: it would ignore them."""
    stage = STAGES.get(name)
    if not stage.prunes or stage.selects_by_prune:
        return
    if prune["target"] == "latency":
        raise UserError("prune.target", f"the {name} stage selects by its own rule, not to a latency target")
    if prune.get("round_to", 1) > 1:
        raise UserError("prune.round_to", f"the {name} stage selects by its own rule; it cannot round widths")


def check_schedule(schedule: dict) -> None:
    stages = STAGE_LIST.check(schedule.get("stages"), "schedule.stages")
    for name in stages:
        STAGES.get(name)
    if len(set(stages)) != len(stages):
        raise UserError("schedule.stages", f"a stage appears twice: {stages}")
    pruning = [s for s in stages if STAGES.get(s).prunes]
    if len(pruning) > 1:
        raise UserError("schedule.stages", f"{' and '.join(pruning)} both prune; list one of them")
    for key, block in schedule.items():
        if key == "stages":
            continue
        if key not in STAGES or STAGES.get(key).options is None:
            raise UserError(
                f"schedule.{key}",
                f"unknown option: not a stage with settings "
                f"(stages with settings: {', '.join(n for n, s in STAGES.items() if s.options)})",
            )
        check_block(block, STAGES.get(key).options, f"schedule.{key}", fill=False)
    for name in stages:
        if STAGES.get(name).options is not None and name not in schedule:
            raise UserError(f"schedule.{name}", "the stage is listed but has no settings block")


def builtin_parts(registry):
    """The (name, part) pairs that ship with prune_cli (a user's registered parts document themselves)."""
    return [(name, part) for name, part in registry.items() if part.__module__.startswith("prune_cli.")]


def options_reference() -> str:
    """Markdown tables of every declared option, generated from the declarations (docs/options.md embeds them)."""
    sections = [
        ("Run (top level)", RUN_OPTIONS, ""),
        ("trainer", settings.OPTIONS, "trainer"),
        ("prune", selection.OPTIONS, "prune"),
    ]
    for name, stage in builtin_parts(STAGES):
        if stage.options:
            sections.append((f"stage `{name}`", stage.options, f"schedule.{name}"))
    for group, registry in NAMED_GROUPS.items():
        for name, _ in builtin_parts(registry):
            options = part_options(group, name)
            if options:
                sections.append((f"{group} `{name}`", options, group))
    out, seen = [], {}
    for title, options, path in sections:
        table = markdown_table(options, path)
        if table in seen:  # parts that share every option (the training stages, model variants) share one table
            seen[table][0].append(title)
            continue
        seen[table] = ([title], table)
    for titles, table in seen.values():
        out.append(f"#### {', '.join(titles)}\n\n{table}\n")
    return "\n".join(out)
