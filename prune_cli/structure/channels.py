"""Channel structure of a model: which tensor dims each channel group owns, counting
params and MACs for any widths, masking channels, and physical removal (surgery).

One mapping (state_dict key -> {dim: group}) serves all three, so the masked
model, the pruned model and the counted numbers can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from prune_cli.structure.attention import parts
from prune_cli.structure.counting import layer_pixels
from prune_cli.structure.groups import ChannelGroup, Slot

if TYPE_CHECKING:  # the interface model families implement (prune_cli.models sits above this layer)
    from prune_cli.models import Prunable

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "factor")
PRODUCER_KEYS = ("weight", "bias", "skeleton")
KEYS_OF = {"producer": PRODUCER_KEYS, "norm": BN_KEYS, "consumer": ("weight",)}  # a slot's tensors, by its role


def slot_keys(slot: Slot) -> tuple[str, ...]:
    """The names of the slot's tensors in its module: by its role (a ``param`` slot: its own parameter)."""
    return (slot.param,) if slot.role == "param" else KEYS_OF[slot.role]


@dataclass
class Structure:
    groups: list[ChannelGroup]
    tensor_dims: dict[str, dict[int, list[tuple[int, Slot]]]]  # state_dict key -> {dim: [(group, its slot)]}
    # counting: the size of every grouped dim of a parameter is fixed + per_channel @ widths (a row per such dim);
    # every parameter tensor has coef * size[r1] * size[r2] elements (r = -1: no such dim, factor 1)
    fixed: np.ndarray
    per_channel: np.ndarray  # [rows, groups]: positions each channel of the group takes in that dim
    coef: np.ndarray
    r1: np.ndarray
    r2: np.ndarray
    macs_per_elem: np.ndarray  # output pixels per weight element (conv: H_out*W_out, linear: 1, other: 0)
    # attention's matmuls QK^T and AV: per attention layer, 2 x query-key pairs per image x its q width, the
    # width its packed q/k/v weight's rows (row ``matmul_rows``; -1: not grouped, ``matmul_fixed`` rows) hold / 3
    matmul_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    matmul_fixed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    matmul_pairs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dim_rows: dict[str, dict[int, int]] = field(default_factory=dict)  # parameter -> {grouped dim: its size's row}
    latency: object = None  # the bound cost model (``cost_model.Predictor``) when a selection targets latency

    def sizes(self, widths) -> np.ndarray:
        """The size of every grouped dim (a row each) with these group widths."""
        return self.fixed + self.per_channel @ np.asarray(widths, dtype=np.float64)

    def count(self, widths) -> tuple[int, int]:
        """(params, MACs per image) of the model with these group widths."""
        size = np.append(self.sizes(widths), 1.0)
        elems = self.coef * size[self.r1] * size[self.r2]
        rows = np.where(self.matmul_rows >= 0, size[self.matmul_rows], self.matmul_fixed)
        matmuls = (2 * self.matmul_pairs * rows / 3).sum()
        return int(round(elems.sum())), int(round((elems * self.macs_per_elem).sum() + matmuls))


def group_dims(model: Prunable, groups: list[ChannelGroup]) -> dict[str, dict[int, list[tuple[int, Slot]]]]:
    """state_dict key -> {dim: [(index of a channel group in that dim, the slot saying where its channels are)]}.

    Every slot of a group: a producer's weight, bias and filter skeleton (dim 0), every per-channel tensor of a
    BatchNorm or LayerNorm (dim 0), a consumer's weight (dim 1), a per-channel parameter (its ``axis``)."""
    keys = model.state_dict().keys()
    dims: dict[str, dict[int, list]] = {}
    for g, group in enumerate(groups):
        for slot in group.slots:
            for key in slot_keys(slot):
                members = dims.setdefault(f"{slot.module}.{key}", {}).setdefault(slot.dim, [])
                if all(h != g for h, _ in members):  # a model without BatchNorm names its conv as the norm too
                    members.append((g, slot))
    return {k: v for k, v in dims.items() if k in keys}


def structure(model: Prunable, input_shape: tuple[int, int, int]) -> Structure:
    """Trace ``model`` once on one ``input_shape`` (C, H, W) image to learn its output sizes."""
    groups = model.channel_groups()
    tensor_dims = group_dims(model, groups)
    pairs: dict[str, int] = {}
    pixels = layer_pixels(model, input_shape, pairs=pairs)

    fixed, per_channel = [], []
    dim_rows: dict[str, dict[int, int]] = {}  # a parameter -> {grouped dim: the row of its size}
    coef, r1, r2, macs = [], [], [], []
    for name, param in model.named_parameters():
        dims = tensor_dims.get(name, {})
        rows = []
        for d, members in dims.items():
            row, covered = np.zeros(len(groups)), 0
            for g, slot in members:
                if slot.positions is None:
                    row[g], covered = row[g] + 1, covered + param.shape[d]
                else:
                    row[g] += len(slot.positions[0])
                    covered += sum(len(p) for p in slot.positions)
            rows.append(len(fixed))
            dim_rows.setdefault(name, {})[d] = len(fixed)
            fixed.append(param.shape[d] - covered), per_channel.append(row)
        coef.append(np.prod([s for d, s in enumerate(param.shape) if d not in dims], dtype=np.float64))
        rows += [-1, -1]
        r1.append(rows[0]), r2.append(rows[1])
        module = name.rsplit(".", 1)[0]
        macs.append(pixels.get(module, 0) if name.endswith("weight") else 0)
    weights = {name: f"{name}.{parts(model.get_submodule(name))[0]}" for name in pairs}  # each one's packed q/k/v
    return Structure(
        groups,
        tensor_dims,
        np.array(fixed, dtype=np.float64),
        np.array(per_channel, dtype=np.float64).reshape(len(fixed), len(groups)),
        np.array(coef),
        np.array(r1),
        np.array(r2),
        np.array(macs, dtype=np.float64),
        np.array([dim_rows.get(w, {}).get(0, -1) for w in weights.values()], dtype=np.int64),
        np.array([model.get_parameter(w).shape[0] for w in weights.values()], dtype=np.float64),
        np.array([pairs[name] for name in weights], dtype=np.float64),
        dim_rows,
    )


def _kept_positions(size: int, members: list[tuple[int, Slot]], keep: list[torch.Tensor]) -> torch.Tensor:
    """The positions of a dim of ``size`` that stay: all but those of the removed channels, in their order."""
    stays = torch.ones(size, dtype=torch.bool)
    for g, slot in members:
        drop = ~keep[g].to(torch.bool).cpu()
        stays[_positions(slot, drop)] = False
    return torch.nonzero(stays).flatten()


def _positions(slot: Slot, channels: torch.Tensor) -> torch.Tensor:
    """The positions the ``channels`` (a bool mask over the group) take in the slot's dim."""
    chosen = torch.nonzero(channels).flatten()
    if slot.positions is None:
        return chosen
    return torch.tensor([p for c in chosen.tolist() for p in slot.positions[c]], dtype=torch.long)


def mask_channels(model: Prunable, keep: list[torch.Tensor]) -> None:
    """Zero removed channels in place (every producer's filters and bias, every norm's gamma and beta): the outputs
    then equal the pruned model's. A group without BatchNorm is zero at its producers' outputs (rows and bias).
    A per-channel parameter multiplied in (a layer scale) is left as it is: the channel it multiplies is zero
    already, and zeroing a divisor would make 0 / 0; one added (a position embedding, a class token) is zeroed.
    A channel a LayerNorm over the channels reads still counts in that norm's mean and variance while masked:
    there the masked model is close to, not equal to, the pruned one (whose norm normalises over the kept
    channels alone). An attention head (or head width) masked is removed exactly: its q, k and v rows zeroed."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for group, k in zip(model.channel_groups(), keep):
            drop = ~k.to(torch.bool).cpu()
            for slot in group.slots:
                if slot.role == "consumer" or (slot.role == "param" and not slot.zeroed):
                    continue
                rows = _positions(slot, drop)
                m = modules[slot.module]
                if slot.role == "param":  # added to the channels: zeroed with them
                    tensor = getattr(m, slot.param)
                    tensor.index_fill_(slot.axis, rows.to(tensor.device), 0)
                    continue
                for tensor in (m.weight, m.bias):
                    if tensor is not None:
                        tensor[rows.to(tensor.device)] = 0


def prune_channels(model: Prunable, keep: list[torch.Tensor]) -> Prunable:
    """A new, smaller dense model holding only the kept channels (``keep``: a bool mask per group)."""
    groups = model.channel_groups()
    index = [torch.nonzero(k.to(torch.bool).cpu()).flatten() for k in keep]
    removable = model.removable_groups()
    if any(len(i) == 0 and g not in removable for g, i in enumerate(index)):
        raise ValueError("surgery would empty a layer")
    state = model.state_dict()
    for key, dims in group_dims(model, groups).items():
        t = state[key]
        for dim, members in dims.items():
            t = t.index_select(dim, _kept_positions(t.shape[dim], members, keep).to(t.device))
        state[key] = t
    pruned = model.build_pruned(index)
    modules = dict(pruned.named_modules())  # a removed group's layers are gone, and their tensors with them
    for key in [k for k in state if k.rpartition(".")[0] not in modules]:
        del state[key]  # in place: the modules' versions (``_metadata``, checked by e.g. MNASNet) stay with it
    pruned.load_state_dict(state)
    p = next(model.parameters())
    return pruned.to(p.device).train(model.training)
