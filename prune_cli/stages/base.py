"""The stage interface and registry: a schedule lists stage names, the pipeline resolves them here.

A stage declares its ``options`` (the ``schedule.<name>`` block; None when it has none), whether it
``prunes`` (its row is the pruned model in the tables), which other config groups it ``reads`` (what the
tables name), its rules across options (``check_config``,
run before anything is read) and what it builds in advance so a bad setting fails before training
(``prepare``, with the run's starting model). ``run`` takes the model and returns the model that continues.
"""

from __future__ import annotations

import abc

from prune_cli.core.options import Option
from prune_cli.core.registry import Registry

STAGES = Registry("stage", "schedule.stages")


class Stage(abc.ABC):
    name: str = ""
    options: tuple[Option, ...] | None = None
    prunes: bool = False
    reforms: bool = False  # it changes the network's form, not its function (the tables' dense row precedes it)
    dense_only: bool = False  # it trains the network a later stage prunes: init_from never gives it a pruned one
    reads: tuple[str, ...] = ()  # config groups it acts on besides its block ("criterion", "prune", "regularizer")
    shared_groups: bool = False  # it handles channels several layers share (a model pruned with prune.residual)
    # it meets prune.target and prune.round_to through the selection engine (a method of its own rule refuses
    # the target latency and round_to > 1 rather than ignore them)
    selects_by_prune: bool = False

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        """Rules across options for a schedule that lists this stage (``cfg``: the checked, plain config)."""

    def prepare(self, ctx, model):
        """Build and check what the stage needs against the model it will get (the run's starting model, or what
        an earlier stage's ``prepare`` returned), so a setting that cannot work fails before any data is read or
        any training runs. A stage that changes the model's structure returns the model the next stages get
        (its structure is what matters; it must not read data); others return None."""

    @abc.abstractmethod
    def run(self, model, ctx, checkpoint: dict | None):
        """Run the stage (``checkpoint``: its unfinished checkpoint, to resume from); return the model."""


def pruning_stages() -> list[str]:
    """Names of the registered stages that prune (the report's dense -> pruned boundary)."""
    return [name for name, stage in STAGES.items() if stage.prunes]


def dense_and_final(rows: list[dict]) -> tuple[dict, dict] | None:
    """The dense model and the final one; None if nothing was pruned. The dense model is the row before pruning,
    or before the first stage that re-formed the network on the way (``Stage.reforms``, e.g. RMNet's rm): what
    the method started from."""
    pruning = pruning_stages()
    i = next((i for i, r in enumerate(rows) if r["stage"] in pruning), None)
    if i is None:
        return None
    reforming = {name for name, stage in STAGES.items() if stage.reforms}
    i = next((j for j in range(i) if rows[j]["stage"] in reforming), i)
    return rows[max(i - 1, 0)], rows[-1]
