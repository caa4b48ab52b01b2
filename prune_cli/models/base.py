"""What every prunable model exposes: its channel groups and how to rebuild it.

A *channel group* is one prunable set of channels: the output channels of a
producer conv, the matching entries of its BatchNorm, and the matching input
channels of every consumer (conv or linear). Models are built from a list of
widths, one per group, so a pruned model is rebuilt from its widths
(``build_model(model.arch)``), never unpickled.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ChannelGroup:
    name: str  # stable name, e.g. "layer1.0" or "features.3"
    conv: str  # module name of the producer conv (its output channels)
    bn: str  # module name of the BatchNorm after it
    consumers: tuple[str, ...]  # modules whose input channels are these channels


class Prunable(nn.Module, abc.ABC):
    """Base class of the model families. ``arch`` holds everything that rebuilds the model."""

    arch: dict

    @abc.abstractmethod
    def channel_groups(self) -> list[ChannelGroup]:
        """The prunable channel groups, in forward order; one per entry of ``arch['widths']``."""

    @property
    def widths(self) -> list[int]:
        return list(self.arch["widths"])
