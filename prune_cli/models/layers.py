"""Layers that methods put into any model, named in its ``arch`` so that ``build_model(arch)`` rebuilds them.

- ``skeleton`` (stripe-wise pruning's filter skeleton, training form): a k x k conv whose weight is
  multiplied by a trainable ``S[o, kh, kw]`` (``SkeletonConv``).
- ``stripes`` (stripe-wise pruning's pruned form): a conv reduced to the kept stripes ``W[o, :, i, j]``, run as
  one 1x1 conv whose outputs are shifted and added into place (``StripeConv``).
- ``factors`` (a learned per-channel scale after a BatchNorm, RMNet's channel masks): ``ScaledBN``.
- ``gather`` (input-channel pruning where the producer keeps its width, e.g. a residual block's first conv
  reading the residual stream under PFP): a conv or linear layer that reads only the listed input channels
  (``GatherConv``, ``GatherLinear``); counted as the smaller layer it is.

``convert(model, kind, spec)`` swaps the named modules of a live model in place (weights kept) and records
the change in ``model.arch[kind]``; ``build_model`` replays ``arch[kind]`` on a freshly built model.
``fold(model)`` multiplies training-time factors into the weights they scale and drops them.
A method module may add its own kind with ``register_kind`` (channel gating's ``gated`` convs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ["skeleton", "factors", "stripes", "gather"]  # the arch keys of layer changes, in the order they are applied
_REGISTERED: dict = {}  # kinds a method adds with register_kind: kind -> make(old module, spec entry)


def register_kind(kind: str, make) -> None:
    """A method's own layer kind, recorded as ``arch[kind] = {module name: entry}`` (plain data):
    ``convert(model, kind, spec)`` swaps each named module for ``make(old, entry)``, which carries the old
    weights over, and ``build_model`` replays it after the built-in kinds."""
    if kind in KINDS and _REGISTERED.get(kind) is not make:
        raise ValueError(f"layer kind {kind!r} is registered twice")
    if kind not in KINDS:
        KINDS.append(kind)
    _REGISTERED[kind] = make


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a BatchNorm in eval mode: ``bn(z) = scale * z + shift`` per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


class SkeletonConv(nn.Conv2d):
    """A conv computing with ``W[o, i, kh, kw] * S[o, kh, kw]``; ``S`` (``skeleton``) starts at 1."""

    folded_params = ("skeleton",)  # measure.count_params leaves it out: it folds into the weight

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skeleton = nn.Parameter(torch.ones(self.out_channels, *self.kernel_size))

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.skeleton.unsqueeze(1), self.bias)

    def folded_weight(self) -> torch.Tensor:
        return self.weight * self.skeleton.unsqueeze(1)


class ScaledBN(nn.BatchNorm2d):
    """BatchNorm whose output channel c is multiplied by a trainable ``factor[c]`` (starts at 1)."""

    folded_params = ("factor",)  # measure.count_params leaves it out: it folds into gamma and beta

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.factor = nn.Parameter(torch.ones(self.num_features))

    def forward(self, x):
        return super().forward(x) * self.factor.view(1, -1, 1, 1)


class StripeConv(nn.Module):
    """The stripes ``W[o, :, i, j]`` kept of a k x k conv, computed as one 1x1 conv and shifted into place.

    ``positions``: the kept (o, i, j) as ``(i * k + j) * out_channels + o``, sorted, so stripes of one kernel
    position are contiguous. ``forward`` equals the k x k conv whose other stripes are zero: for each
    position (i, j), the 1x1 outputs of its stripes, padded like the conv, are read at rows
    ``p * stride + i`` and columns ``q * stride + j`` and added into output channels ``o``.
    Counted as ``n * C_in`` weights at ``H_out * W_out`` output positions (``counted_layer``).
    """

    counted_layer = True  # measure.layer_pixels counts it like a conv: weight elements x output pixels

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        positions: list[int],
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.k = in_channels, out_channels, kernel_size
        self.stride, self.padding = stride, padding
        positions = sorted(positions)
        self.positions = positions
        self.weight = nn.Parameter(torch.empty(len(positions), in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        k = kernel_size
        rows = [(p // out_channels) // k for p in positions]
        cols = [(p // out_channels) % k for p in positions]
        # every stripe's kernel position and output channel; one gather and one index_add place them all
        self.register_buffer("_row", torch.tensor(rows, dtype=torch.long), persistent=False)
        self.register_buffer("_col", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.register_buffer("out_index", torch.tensor([p % out_channels for p in positions], dtype=torch.long), False)
        self._gather: dict = {}  # (H, W, device) -> index into the padded 1x1 outputs, built once per input size

    def output_size(self, size: int) -> int:
        return (size + 2 * self.padding - self.k) // self.stride + 1

    def gather_index(self, height: int, width: int) -> torch.Tensor:
        """[n, H_out * W_out]: where stripe n's value for each output position lies in its padded 1x1 output,
        ``(p * stride + i) * W_padded + q * stride + j`` for a stripe at kernel position (i, j)."""
        key = (height, width, self._row.device)
        if key not in self._gather:
            h, w, s = self.output_size(height), self.output_size(width), self.stride
            padded_width = width + 2 * self.padding
            r = torch.arange(h, device=self._row.device).view(1, h, 1) * s + self._row.view(-1, 1, 1)
            c = torch.arange(w, device=self._row.device).view(1, 1, w) * s + self._col.view(-1, 1, 1)
            self._gather = {key: (r * padded_width + c).view(len(self.positions), h * w)}
        return self._gather[key]

    def forward(self, x):
        # every kept stripe at every input position, zero-padded like the conv (a 1x1 conv pads with zeros)
        y = F.conv2d(x, self.weight, padding=self.padding)
        index = self.gather_index(x.shape[2], x.shape[3])
        shifted = y.flatten(2).gather(2, index.unsqueeze(0).expand(x.shape[0], -1, -1))
        out = x.new_zeros(x.shape[0], self.out_channels, index.shape[1]).index_add_(1, self.out_index, shifted)
        out = out.view(x.shape[0], self.out_channels, self.output_size(x.shape[2]), self.output_size(x.shape[3]))
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        dense = self.out_channels * self.k * self.k
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.k}, stride={self.stride}, "
            f"padding={self.padding}, stripes={len(self.positions)}/{dense}"
        )


class _Gather:
    """Reads only the input channels ``inputs`` (a buffer, rebuilt from ``arch``) of what it is given."""

    def _set_inputs(self, inputs: list[int]) -> None:
        self.register_buffer("inputs", torch.tensor(inputs, dtype=torch.long), persistent=False)

    def forward(self, x):
        return super().forward(x.index_select(1, self.inputs))


class GatherConv(_Gather, nn.Conv2d):
    def __init__(self, inputs: list[int], **conv_args):
        super().__init__(**{**conv_args, "in_channels": len(inputs)})
        self._set_inputs(inputs)


class GatherLinear(_Gather, nn.Linear):
    def __init__(self, inputs: list[int], out_features: int, bias: bool = True):
        super().__init__(len(inputs), out_features, bias=bias)
        self._set_inputs(inputs)


def _gathered(layer: nn.Module, positions: list[int]) -> nn.Module:
    """``layer`` reading only ``positions`` of its current inputs (composed with an earlier gather)."""
    index = torch.tensor(positions, dtype=torch.long)
    inputs = layer.inputs.cpu()[index] if isinstance(layer, _Gather) else index
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        new = GatherConv(inputs.tolist(), **_conv_args(layer))
    elif isinstance(layer, nn.Linear):
        new = GatherLinear(inputs.tolist(), layer.out_features, bias=layer.bias is not None)
    else:
        raise ValueError(f"cannot gather the inputs of {type(layer).__name__}")
    with torch.no_grad():
        new.weight.copy_(layer.weight.detach()[:, index.to(layer.weight.device)])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def stripe_positions(mask: torch.Tensor) -> list[int]:
    """The kept stripes of a boolean ``mask[o, i, j]`` in ``StripeConv`` order."""
    o, i, j = torch.nonzero(mask.cpu(), as_tuple=True)
    k, out = mask.shape[1], mask.shape[0]
    return sorted(((i * k + j) * out + o).tolist())


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )


def _as_stripes(conv: nn.Conv2d, positions: list[int]) -> StripeConv:
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if conv.kernel_size[1] != k or conv.stride[1] != s or conv.padding[1] != p or conv.groups != 1:
        raise ValueError("stripes need a square, ungrouped conv with equal strides and paddings")
    new = StripeConv(conv.in_channels, conv.out_channels, k, positions, s, p, bias=conv.bias is not None)
    w = conv.folded_weight() if isinstance(conv, SkeletonConv) else conv.weight
    with torch.no_grad():  # rows W[o, :, i, j] in the order of `positions`
        flat = w.detach().permute(2, 3, 0, 1).reshape(-1, conv.in_channels)
        new.weight.copy_(flat[torch.tensor(new.positions, dtype=torch.long, device=flat.device)].view_as(new.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def convert(model: nn.Module, kind: str, spec) -> None:
    """Swap modules of ``model`` in place, keeping their weights, and record it in ``model.arch[kind]``.

    ``skeleton``: conv names; ``factors``: BatchNorm names; ``stripes``: {conv name: stripe positions};
    ``gather``: {conv or linear name: the positions kept among its current inputs} (recorded as the channels it
    reads of its input).
    """
    modules = dict(model.named_modules())
    for name in spec:
        old = modules[name]
        if kind == "skeleton":
            new = SkeletonConv(**_conv_args(old))
        elif kind == "factors":
            new = ScaledBN(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats)
        elif kind == "stripes":
            new = _as_stripes(old, spec[name])
        elif kind == "gather":
            new = _gathered(old, spec[name])
        elif kind in _REGISTERED:
            new = _REGISTERED[kind](old, spec[name])
        else:
            raise ValueError(f"unknown layer kind {kind!r}")
        if kind in ("skeleton", "factors"):
            new.load_state_dict(old.state_dict(), strict=False)  # the new factor keeps its initial value
        _swap(model, name, new.to(next(old.parameters()).device))
    arch = getattr(model, "arch", None)
    if arch is not None:
        previous = arch.get(kind) or ({} if kind == "stripes" else [])
        if kind == "stripes":
            arch[kind] = {**previous, **{n: list(p) for n, p in spec.items()}}
            arch["skeleton"] = [n for n in arch.get("skeleton") or [] if n not in spec]
        elif kind == "gather":
            modules = dict(model.named_modules())
            arch[kind] = {**(arch.get(kind) or {}), **{n: modules[n].inputs.tolist() for n in spec}}
        elif kind in _REGISTERED:
            arch[kind] = {**(arch.get(kind) or {}), **spec}
        else:
            arch[kind] = [*previous, *[n for n in spec if n not in previous]]


def apply_layers(model: nn.Module, arch: dict) -> nn.Module:
    """Replay the layer changes ``arch`` records on a freshly built model (``build_model`` does this)."""
    modules = dict(model.named_modules())
    for kind in KINDS:
        if arch.get(kind):  # layers of a removed group (e.g. a block reduced to its shortcut) are gone
            spec = arch[kind]
            kept = [n for n in spec if n in modules]
            convert(model, kind, {n: spec[n] for n in kept} if isinstance(spec, dict) else kept)
    return model


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """Multiply skeletons into their conv weights and factors into their BatchNorm's gamma and beta, in place;
    the model then holds plain convs and BatchNorms and computes the same function."""
    for name, m in list(model.named_modules()):
        if isinstance(m, SkeletonConv):
            plain = nn.Conv2d(**_conv_args(m)).to(m.weight.device)
            plain.weight.copy_(m.folded_weight())
            if m.bias is not None:
                plain.bias.copy_(m.bias)
            _swap(model, name, plain)
        elif isinstance(m, ScaledBN):
            plain = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            state = {k: v for k, v in m.state_dict().items() if k != "factor"}
            state["weight"], state["bias"] = m.weight * m.factor, m.bias * m.factor
            plain.load_state_dict(state)
            _swap(model, name, plain.to(m.weight.device))
    arch = getattr(model, "arch", None)
    if arch is not None:
        arch.pop("skeleton", None), arch.pop("factors", None)
    return model


__all__ = [
    "KINDS",
    "GatherConv",
    "GatherLinear",
    "ScaledBN",
    "SkeletonConv",
    "StripeConv",
    "apply_layers",
    "convert",
    "fold",
    "register_kind",
    "stripe_positions",
]
