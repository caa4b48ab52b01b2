"""Which config differences a run directory accepts: a resumed run may change how it runs, never what it computes."""

from __future__ import annotations

import fnmatch

# options that may change between a run and its resumption without changing its results
RESUMABLE_DIFFERENCES = (
    "trainer.device",
    "trainer.progress",
    "trainer.threads",
    "trainer.eval_batch_size",
    "logger.name",
    "logger.dir",
    "latency",
    "dataset.stream",  # imagefolder: streamed or in memory, the same batches
    "dataset.workers",
)


# options added after runs were written, with the behaviour those runs had: absent from an old config means this
# (keys are patterns: a stage block's option is added to every stage)
ADDED_OPTIONS = {
    "model.prune_outputs": False,
    "model.last_maxpool": True,
    "prune.step_grid": "linear",
    "prune.residual": False,
    "schedule.*.grda": {"c": 0.005, "mu": 0.51},
    "logger": {"name": "none"},
    "latency": "off",
    # "auto" keeps a resumed run's recorded format, and a run recorded before the option existed trained contiguous
    "trainer.memory_format": "auto",
    "trainer.sync_bn": False,
    "trainer.compile": False,
    "trainer.compile_backend": "inductor",
}


def added_option(name: str):
    return next((value for pattern, value in ADDED_OPTIONS.items() if fnmatch.fnmatchcase(name, pattern)), None)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        name = f"{prefix}{k}"
        if name in RESUMABLE_DIFFERENCES:
            continue
        a, b = old.get(k, added_option(name)), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append(name)
    return out
