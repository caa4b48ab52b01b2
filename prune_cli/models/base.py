"""What every prunable model family exposes, behind one interface, and the registry of families.

A model exposes its *channel groups* (``prune_cli.structure.groups``): the prunable sets of channels. A model is
built from a list of widths, one per group, so a pruned model is rebuilt from its widths
(``build_model(model.arch)``), never unpickled. Families register by decorator:
``@MODELS.register("resnet20", "resnet56")``; nothing outside ``prune_cli/models`` tests model types.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.core.options import Float, Option
from prune_cli.core.registry import Registry
from prune_cli.models.layers import KINDS, apply_layers
from prune_cli.structure.groups import ChannelGroup

MODELS = Registry("model", "model.name")

WIDTH_MULT = Float(
    "width_mult",
    1.0,
    "multiplies every width (channel expansion, e.g. 1.25 for Pruning from Scratch)",
    lo=0.0,
    lo_open=True,
)


def scaled_widths(name: str, base: list[int], width_mult: float) -> list[int]:
    """``base`` widths times ``width_mult``, rounded; a multiplier that rounds a layer to no channel is refused
    here, before any data is read (a network of one-channel layers would leave nothing to prune)."""
    widths = [round(w * width_mult) for w in base]
    if min(widths, default=1) < 1:
        narrowest = min(base)
        raise UserError(
            "model.width_mult",
            f"{width_mult:g} rounds {name}'s {narrowest}-channel layers to 0 channels; "
            f"use at least {0.5 / narrowest:.3g}",
        )
    return widths


class Prunable(nn.Module, abc.ABC):
    """Base class of the model families. ``arch`` holds everything that rebuilds the model."""

    arch: dict

    @classmethod
    def options_for(cls, name: str) -> tuple[Option, ...]:
        """The ``model.*`` options of the variant ``name`` (besides ``name`` itself)."""
        return (WIDTH_MULT,)

    def aux_loss(self, y: torch.Tensor) -> torch.Tensor | None:
        """The weighted loss of auxiliary heads of the last training forward, added to the training loss (None:
        the network has none)."""
        return None

    @abc.abstractmethod
    def channel_groups(self) -> list[ChannelGroup]:
        """The prunable channel groups, in forward order; one per entry of ``widths``."""

    def last_groups(self) -> set[int]:
        """Groups whose channels feed the classifier directly: what ``prune.protect_last`` keeps whole."""
        return set()

    def removable_groups(self) -> set[int]:
        """Groups that may lose every channel (width 0): the model then computes without them, e.g. a
        residual block reduced to its shortcut. Other groups keep at least one channel."""
        return set()

    def shortcut_convs(self) -> list[str]:
        """Module names of residual projection convs (regularizers may leave them out)."""
        return []

    def segments(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """The model as a chain of (module-name prefix, function): ``model(x)`` = the functions in turn.

        Lets a caller cache a segment's input and re-run only from the segment that holds a channel
        group (the loss greedy does). The default is one segment, the whole model.
        """
        return [("", self)]

    @property
    def widths(self) -> list[int]:
        """The width of every channel group, in ``channel_groups()`` order (removed groups, width 0, excluded)."""
        return [w for w in self.arch["widths"] if w]

    def pruned_arch(self, index: list) -> dict:
        """The ``arch`` of this model keeping, of every channel group (``channel_groups()`` order), the channels
        ``index[g]`` (a 1-D tensor of kept positions; empty removes a group ``removable_groups`` allows)."""
        it = iter(len(i) for i in index)
        return {**self.arch, "widths": [next(it) if w else 0 for w in self.arch["widths"]]}

    def build_pruned(self, index: list) -> Prunable:
        """A new (untrained) model of ``pruned_arch(index)``: what surgery loads the kept weights into."""
        return build_model(self.pruned_arch(index))


def build_model(arch: dict) -> Prunable:
    """``arch`` = the model's ``arch`` dict (name, num_classes, in_channels, widths, ...), including the
    layer changes methods recorded in it (``layers.KINDS``: skeletons, factors, stripes)."""
    model = MODELS.get(arch["name"])(**{k: v for k, v in arch.items() if k not in KINDS})
    return apply_layers(model, arch)
