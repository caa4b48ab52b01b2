"""Channel structure of a model: which tensor dims each channel group owns, counting
params and MACs for any widths, masking channels, and physical removal (surgery).

One mapping (state_dict key -> {dim: group}) serves all three, so the masked
model, the pruned model and the counted numbers can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .measure import layer_pixels
from .models import ChannelGroup, Prunable, build_model

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "factor")
PRODUCER_KEYS = ("weight", "bias", "skeleton")


@dataclass
class Structure:
    groups: list[ChannelGroup]
    tensor_dims: dict[str, dict[int, int]]  # state_dict key -> {dim: group index}
    # counting: every parameter tensor as coef * w[g1] * w[g2] (g = -1 means "fixed", factor 1)
    coef: np.ndarray
    g1: np.ndarray
    g2: np.ndarray
    macs_per_elem: np.ndarray  # output pixels per weight element (conv: H_out*W_out, linear: 1, other: 0)

    def count(self, widths) -> tuple[int, int]:
        """(params, MACs per image) of the model with these group widths."""
        w = np.append(np.asarray(widths, dtype=np.float64), 1.0)
        elems = self.coef * w[self.g1] * w[self.g2]
        return int(round(elems.sum())), int(round((elems * self.macs_per_elem).sum()))


def group_dims(model: Prunable, groups: list[ChannelGroup]) -> dict[str, dict[int, int]]:
    """state_dict key -> {dim: index of the channel group that owns that dim}.

    The producer's weight, bias and filter skeleton (dim 0), every per-channel tensor of the BatchNorm
    (dim 0) and the consumers' weights (dim 1)."""
    keys = model.state_dict().keys()
    dims: dict[str, dict[int, int]] = {}
    for g, group in enumerate(groups):
        for key in PRODUCER_KEYS:
            dims.setdefault(f"{group.conv}.{key}", {})[0] = g
        for key in BN_KEYS:
            dims.setdefault(f"{group.bn}.{key}", {})[0] = g
        for consumer in group.consumers:
            dims.setdefault(f"{consumer}.weight", {})[1] = g
    return {k: v for k, v in dims.items() if k in keys}


def structure(model: Prunable, input_shape: tuple[int, int, int]) -> Structure:
    """Trace ``model`` once on one ``input_shape`` (C, H, W) image to learn its output sizes."""
    groups = model.channel_groups()
    tensor_dims = group_dims(model, groups)

    pixels = layer_pixels(model, input_shape)

    coef, g1, g2, macs = [], [], [], []
    for name, param in model.named_parameters():
        dims = tensor_dims.get(name, {})
        fixed = np.prod([s for d, s in enumerate(param.shape) if d not in dims], dtype=np.float64)
        gs = list(dims.values()) + [-1, -1]
        coef.append(fixed), g1.append(gs[0]), g2.append(gs[1])
        module = name.rsplit(".", 1)[0]
        macs.append(pixels.get(module, 0) if name.endswith("weight") else 0)
    return Structure(groups, tensor_dims, np.array(coef), np.array(g1), np.array(g2), np.array(macs, dtype=np.float64))


def mask_channels(model: Prunable, keep: list[torch.Tensor]) -> None:
    """Zero removed channels in place (filter, BN gamma and beta): the outputs then equal the pruned model's."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for group, k in zip(model.channel_groups(), keep):
            drop = ~k.to(torch.bool)
            for tensor in (modules[group.conv].weight, modules[group.bn].weight, modules[group.bn].bias):
                tensor[drop.to(tensor.device)] = 0


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
        for dim, g in dims.items():
            t = t.index_select(dim, index[g].to(t.device))
        state[key] = t
    pruned = build_model(model.pruned_arch(index))
    modules = dict(pruned.named_modules())  # a removed group's layers are gone, and their tensors with them
    pruned.load_state_dict({k: v for k, v in state.items() if k.rpartition(".")[0] in modules})
    p = next(model.parameters())
    return pruned.to(p.device).train(model.training)
