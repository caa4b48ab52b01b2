"""Which config differences a run directory accepts: a resumed run may change how it runs, never what it computes."""

from __future__ import annotations

from prune_cli.core.options import ALWAYS
from prune_cli.run.config import absent_value

# options that may change between a run and its resumption without changing its results
RESUMABLE_DIFFERENCES = (
    "trainer.device",
    "trainer.progress",
    "trainer.threads",
    "trainer.eval_batch_size",
    "logger.name",
    "logger.dir",
    "logger.tracking_uri",
    "logger.experiment",
    "objective.metric",  # what the run returns to a sweeper, not what it computes
    "objective.budget",
    "objective.budget_of",
    "objective.penalty",
    "latency",
    "dataset.stream",  # imagefolder: streamed or in memory, the same batches
    "dataset.workers",
)

# options whose ``auto`` a resumed run settles as its checkpoints recorded: a run recorded before ``auto`` existed
# (or with true / false) goes on as it ran
SETTLED_ON_RESUME = ("prune.residual",)


def added_option(name: str):
    """What a config written before the option ``name`` existed means (its declaration's ``absent``), or None for
    an option every config holds."""
    value = absent_value(name)
    return None if value is ALWAYS else value


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        name = f"{prefix}{k}"
        if name in RESUMABLE_DIFFERENCES:
            continue
        a, b = old.get(k, added_option(name)), new.get(k)
        if name in SETTLED_ON_RESUME and b == "auto":
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append(name)
    return out


def settled_on_resume(old: dict, new: dict) -> dict:
    """{option: the value the run ``old`` recorded} of the options ``SETTLED_ON_RESUME`` that ``new`` leaves at auto."""
    out = {}
    for name in SETTLED_ON_RESUME:
        block, recorded = new, old
        *parents, leaf = name.split(".")
        for part in parents:
            block, recorded = block.get(part, {}), recorded.get(part, {})
        if block.get(leaf) == "auto":
            out[name] = recorded.get(leaf, added_option(name))
    return out
