"""Channel groups: the prunable units of a network, each the layers (slots) that hold its channels and where."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Slot:
    """One layer holding a group's channels, by ``role``: a ``producer`` (conv / linear output rows, or a depthwise
    conv's), a ``norm`` (BatchNorm or LayerNorm entries: where masks apply), a ``consumer`` (input columns, dim 1)
    or a ``param``: a parameter ``param`` of the module holding one value per channel in its dim ``axis`` (a layer
    scale [C, 1, 1], a position embedding, an attention's per-head tensor; sliced and counted with the channels;
    masked only if ``zeroed``: one added to the channels, which must stay 0, not one multiplying a channel
    already zero).
    The group's channel i sits at ``positions[i]`` of that dim (a tuple: several positions for an input flattened
    into a linear layer, or a whole group of a grouped conv); ``None``: at i, the layer holding exactly the
    group's channels. ``out_dim``: the dim of the module's output holding the channels (1; 3 for a layer on a
    channels-last [B, H, W, C] tensor), where the activation criteria read them."""

    module: str
    role: str
    positions: tuple[tuple[int, ...], ...] | None = None
    param: str = ""
    axis: int = 0
    out_dim: int = 1
    zeroed: bool = False

    @property
    def dim(self) -> int:
        return 1 if self.role == "consumer" else self.axis if self.role == "param" else 0

    def index(self) -> torch.Tensor | None:
        """The positions as a [channels, positions per channel] index (None: the identity)."""
        return None if self.positions is None else torch.tensor(self.positions, dtype=torch.long)


@dataclass(frozen=True)
class ChannelGroup:
    name: str  # stable name, e.g. "layers.1.0" or "conv3"; what prune.skip / layer_ratios patterns match
    conv: str  # module name of the producer conv (its output channels; the first one if there are several)
    # module name of the BatchNorm after it: where a channel mask applies (the first one if several); a network
    # without BatchNorm names the conv itself (its output is where the mask applies)
    bn: str
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

    def mask_points(self) -> list[Slot]:
        """Where a masked channel is zero and the activation criteria read it (along each slot's ``out_dim``): its
        norms' outputs (BatchNorm, LayerNorm), or, in a network without them, its producers' outputs (their rows
        and biases zeroed)."""
        return self.role("norm") or self.role("producer")

    def width(self, modules: dict[str, nn.Module]) -> int:
        """The number of channels (``modules``: the model's named modules)."""
        slot = self.slots[0]
        if slot.positions is not None:
            return len(slot.positions)
        return getattr(modules[slot.module], slot.param or "weight").shape[slot.dim]
