"""Learning-rate schedules (``schedule.<stage>.lr_schedule``): a registry of epoch -> lr rules.

Each schedule is a pure function of the epoch and the stage's settings (``lr``, ``gamma``, ``milestones``,
``step_size``), so resuming a stage needs no schedule state.
"""

from __future__ import annotations

import abc
import math
from dataclasses import replace

from prune_cli.core.options import Choice, Option
from prune_cli.core.registry import Registry

LR_SCHEDULES = Registry("lr schedule", "schedule.<stage>.lr_schedule")


class LRSchedule(abc.ABC):
    """One rule for the learning rate of each epoch of a stage."""

    name: str = ""

    @staticmethod
    @abc.abstractmethod
    def lr(st, epoch: int, epochs: int) -> float:
        """The lr of ``epoch`` (0-based) in a stage of ``epochs`` epochs; every registered schedule defines it."""


@LR_SCHEDULES.register("multistep")
class MultiStep(LRSchedule):
    """Times gamma at each milestone passed (milestones: fractions of the epochs)."""

    @staticmethod
    def lr(st, epoch: int, epochs: int) -> float:
        return st.lr * st.gamma ** sum(epoch >= round(m * epochs) for m in st.milestones)


@LR_SCHEDULES.register("step")
class Step(LRSchedule):
    """Times gamma every ``step_size`` (a fraction) of the epochs."""

    @staticmethod
    def lr(st, epoch: int, epochs: int) -> float:
        return st.lr * st.gamma ** (epoch // max(1, round(st.step_size * epochs)))


@LR_SCHEDULES.register("cosine")
class Cosine(LRSchedule):
    """Half a cosine from lr down towards 0 over the stage."""

    @staticmethod
    def lr(st, epoch: int, epochs: int) -> float:
        return 0.5 * st.lr * (1 + math.cos(math.pi * epoch / epochs))


@LR_SCHEDULES.register("constant")
class Constant(LRSchedule):
    """The stage's lr throughout."""

    @staticmethod
    def lr(st, epoch: int, epochs: int) -> float:
        return st.lr


@LR_SCHEDULES.register("linear")
class Linear(LRSchedule):
    """lr until milestones[0], a straight ramp to lr * gamma at milestones[1], then held (gRDA's schedule)."""

    @staticmethod
    def lr(st, epoch: int, epochs: int) -> float:
        start, end = round(st.milestones[0] * epochs), round(st.milestones[1] * epochs)
        share = min(max((epoch - start) / max(end - start, 1), 0.0), 1.0)
        return st.lr + (st.lr * st.gamma - st.lr) * share


def lr_at(st, epoch: int, epochs: int) -> float:
    """Learning rate of ``epoch`` (0-based) in a stage of ``epochs`` epochs, by the schedule ``st`` names.

    A pure function, so resuming needs no state."""
    return LR_SCHEDULES.get(st.lr_schedule).lr(st, epoch, epochs)


# The option naming a schedule, with the built-in ones: the training stages' own options are declared when they are
# imported (the cg stage copies them), before a registry lookup has discovered schedules that other modules register
LR_SCHEDULE = Choice(
    "lr_schedule",
    "multistep",
    ("multistep", "step", "cosine", "constant", "linear"),
    "the learning-rate schedule (linear: lr until milestones[0], then linearly to lr * gamma at milestones[1])",
)


def schedule_option() -> Option:
    """The ``lr_schedule`` option of a training stage: the built-in schedules, then any other registered one."""
    others = sorted(set(LR_SCHEDULES.names()) - set(LR_SCHEDULE.choices))
    return replace(LR_SCHEDULE, choices=LR_SCHEDULE.choices + tuple(others))
