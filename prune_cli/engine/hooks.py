"""Training hooks: what a training stage does beside plain training, each switched on by its own option block.

A hook may add networks to train beside the model (each with its own data order), give every network its own
lr function, and act on the networks after every epoch. It registers itself (``@TRAINING_HOOKS.register(name)``)
and declares its block as its ``options``: the training stages list that block among their options, ask every
hook whether their settings switch it on (``active_hooks``) and hand the active ones to ``fit``. The loop calls
hooks between epochs only, never per step, so a stage without one trains exactly as a plain loop.
"""

from __future__ import annotations

from collections.abc import Callable

from prune_cli.core.options import Option
from prune_cli.core.registry import Registry

TRAINING_HOOKS = Registry("training hook", "schedule.<stage>")


class TrainingHook:
    """The points where a hook acts on a training stage; each does nothing unless a hook overrides it."""

    name: str = ""
    options: tuple[Option, ...] = ()  # the blocks it adds to every training stage's settings

    @classmethod
    def switched_on(cls, st) -> TrainingHook | None:
        """The hook as a stage's settings ``st`` configure it, or None when they leave it off."""
        return None

    def partners(self, model, *, copies: bool, seed: int, stage: str) -> list:
        """Networks to train beside ``model``: copies of it when ``copies`` (a finetune), else new ones."""
        return []

    def lr_functions(self, st, networks: int, epochs: int) -> list[Callable[[int], float]] | None:
        """One epoch -> lr function per network, or None: every network follows the stage's schedule."""
        return None

    def after_epoch(self, models: list, epoch: int, seed: int) -> None:
        """Act on the networks once an epoch's training is done, before they are tested."""


def active_hooks(st) -> list[TrainingHook]:
    """The hooks a training stage's settings ``st`` switch on, in name order."""
    hooks = (part.switched_on(st) for _, part in TRAINING_HOOKS.items())
    return [hook for hook in hooks if hook is not None]
