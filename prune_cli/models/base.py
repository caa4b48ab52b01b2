"""What every prunable model family exposes, behind one interface, and the registry of families.

A *channel group* is one prunable set of channels: the output channels of a producer conv, the
matching entries of its BatchNorm (where a channel mask applies: the BN output times 0 is exactly the
channel removed), and the matching input channels of every consumer (conv or linear). A group several layers
hold (a residual stream: every block's last conv, its BatchNorms, the readers of the stream) lists them all as
``Slot``s, each with the positions of the group's channels in that layer (``prune.residual=true``). A model is
built from a list of widths, one per group, so a pruned model is rebuilt from its widths
(``build_model(model.arch)``), never unpickled. Families register by decorator:
``@MODELS.register("resnet20", "resnet56")``; nothing outside ``prune_cli/models`` tests model types.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..options import Float, Option
from ..registry import Registry

MODELS = Registry("model", "model.name")

WIDTH_MULT = Float(
    "width_mult",
    1.0,
    "multiplies every width (channel expansion, e.g. 1.25 for Pruning from Scratch)",
    lo=0.0,
    lo_open=True,
)


@dataclass(frozen=True)
class Slot:
    """One layer holding a group's channels, by ``role``: a ``producer`` (conv / linear output rows, or a depthwise
    conv's), a ``norm`` (BatchNorm entries: where masks apply) or a ``consumer`` (input columns, dim 1). The group's
    channel i sits at ``positions[i]`` of that dim (a tuple: several positions for an input flattened into a
    linear layer, or a whole group of a grouped conv); ``None``: at i, the layer holding exactly the group's
    channels."""

    module: str
    role: str
    positions: tuple[tuple[int, ...], ...] | None = None

    @property
    def dim(self) -> int:
        return 1 if self.role == "consumer" else 0

    def index(self) -> torch.Tensor | None:
        """The positions as a [channels, positions per channel] index (None: the identity)."""
        return None if self.positions is None else torch.tensor(self.positions, dtype=torch.long)


@dataclass(frozen=True)
class ChannelGroup:
    name: str  # stable name, e.g. "layers.1.0" or "conv3"; what prune.skip / layer_ratios patterns match
    conv: str  # module name of the producer conv (its output channels; the first one if there are several)
    bn: str  # module name of the BatchNorm after it: where a channel mask applies (the first one if several)
    consumers: tuple[str, ...]  # modules whose input channels are these channels
    # every layer holding the channels, for a group that several layers produce (a residual stream, a depthwise
    # chain) or whose channels sit at other positions than 0..n-1 (concatenations, padded streams); empty: the
    # conv, the bn and the consumers above, at positions 0..n-1
    shared: tuple[Slot, ...] = ()

    @property
    def slots(self) -> tuple[Slot, ...]:
        if self.shared:
            return self.shared
        return (Slot(self.conv, "producer"), Slot(self.bn, "norm"), *(Slot(c, "consumer") for c in self.consumers))

    def role(self, role: str) -> list[Slot]:
        return [s for s in self.slots if s.role == role]

    def width(self, modules: dict[str, nn.Module]) -> int:
        """The number of channels (``modules``: the model's named modules)."""
        slot = self.slots[0]
        return len(slot.positions) if slot.positions is not None else modules[slot.module].weight.shape[slot.dim]


class Prunable(nn.Module, abc.ABC):
    """Base class of the model families. ``arch`` holds everything that rebuilds the model."""

    arch: dict

    @classmethod
    def options_for(cls, name: str) -> tuple[Option, ...]:
        """The ``model.*`` options of the variant ``name`` (besides ``name`` itself)."""
        return (WIDTH_MULT,)

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
