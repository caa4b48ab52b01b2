"""The optimizers a training stage can name (``schedule.<stage>.optimizer``): a registry of builders.

An optimizer registers a builder class (``@OPTIMIZERS.register(name)``) that makes the torch optimizer from the
stage's settings and declares the option blocks it reads beyond them (a method's optimizer registers from the
method's own module); the training stages list those blocks among their options and offer every registered name.
"""

from __future__ import annotations

import abc

import torch

from prune_cli.core.options import Choice, Option
from prune_cli.core.registry import Registry

OPTIMIZERS = Registry("optimizer", "schedule.<stage>.optimizer")
DEFAULT = "sgd"


class OptimizerBuilder(abc.ABC):
    """Makes one kind of torch optimizer from a training stage's settings (``lr``, ``momentum``, ...)."""

    name: str = ""
    options: tuple[Option, ...] = ()  # the blocks it adds to every training stage's settings
    note: str = ""  # what the ``optimizer`` option's doc says of it

    @classmethod
    @abc.abstractmethod
    def build(cls, params, st) -> torch.optim.Optimizer:
        """The optimizer of ``params`` with the stage's settings ``st``; every registered optimizer defines it."""


@OPTIMIZERS.register("sgd")
class SGDBuilder(OptimizerBuilder):
    """SGD with momentum (optionally Nesterov) and L2 weight decay."""

    @classmethod
    def build(cls, params, st) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params, lr=st.lr, momentum=st.momentum, nesterov=st.nesterov, weight_decay=st.weight_decay
        )


@OPTIMIZERS.register("adam")
class AdamBuilder(OptimizerBuilder):
    """Adam with beta1 = ``momentum`` and L2 weight decay."""

    @classmethod
    def build(cls, params, st) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=st.lr, betas=(st.momentum, 0.999), weight_decay=st.weight_decay)


def make_optimizer(params, st) -> torch.optim.Optimizer:
    """The optimizer ``st.optimizer`` names, over ``params``, with the stage's settings."""
    return OPTIMIZERS.get(st.optimizer).build(params, st)


def optimizer_option() -> Option:
    """The ``optimizer`` option of a training stage: every registered optimizer, the default first."""
    names = [DEFAULT, *(name for name in OPTIMIZERS.names() if name != DEFAULT)]
    notes = "; ".join(f"{name}: {OPTIMIZERS.get(name).note}" for name in names if OPTIMIZERS.get(name).note)
    return Choice("optimizer", DEFAULT, names, "the optimizer" + (f" ({notes})" if notes else ""))
