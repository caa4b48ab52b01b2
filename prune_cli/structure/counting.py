"""Params and MACs of a model: the one place that counts (docs/methods.md "Counting conventions").

MACs are those of conv and linear layers for one image: ``weight.numel() x output pixels`` per layer
(grouped convs included, since their weight holds ``C_in / groups`` inputs), measured by one traced
forward, and attention's matmuls QK^T and AV (query x key pairs x the q and v widths); bias, norms, activations,
softmax, pooling and residual additions are not counted. ``mean_dynamic_macs``: the same
count, per image and averaged, for networks whose layers skip work depending on the input (channel gating).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prune_cli.structure.attention import form, parts, tokens


def count_params(model: torch.nn.Module) -> int:
    """Every element of model.parameters(): BN affine and biases included, buffers excluded.

    Training-time factors that fold exactly into the weights they scale (a layer's ``folded_params``: SWP's
    filter skeletons, channel factors) are not counted: they are not part of the network the run delivers."""
    folded = {
        f"{name}.{p}" if name else p for name, m in model.named_modules() for p in getattr(m, "folded_params", ())
    }
    return sum(p.numel() for name, p in model.named_parameters() if name not in folded)


def layer_pixels(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    run: Callable[[torch.Tensor], object] | None = None,
    pairs: dict[str, int] | None = None,
) -> dict[str, int]:
    """{module name: output pixels per image} of every conv (H_out x W_out) and linear layer (the positions it
    runs at: 1 on [B, F], H x W on a channels-last [B, H, W, C], N on [B, N, D] tokens), and of every module
    that declares ``counted_layer`` (a conv in another form, e.g. stripes); into ``pairs``, if given, {module
    name: query x key pairs per image} of every attention layer of a known form (its matmuls' MACs per unit of
    width: ``attention.tokens``).

    One forward of a zero image in eval mode (``run(x)`` instead of ``model(x)`` when given); the
    model's training flags are restored.
    """
    pixels: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: pixels.__setitem__(name, _pixels(m, o)))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) or getattr(m, "counted_layer", False)
    ]
    if pairs is not None:
        hooks += [
            m.register_forward_hook(lambda m, i, o, name=name: pairs.__setitem__(name, tokens(m, i[0].shape)[1]))
            for name, m in model.named_modules()
            if form(m) is not None
        ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            (run or model)(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return pixels


def _pixels(module: nn.Module, out: torch.Tensor) -> int:
    """Output pixels of one image: a linear layer's positions (every dim but the batch and its features, the
    last), a conv's H_out x W_out (every dim but the batch and the channels)."""
    if isinstance(module, nn.Linear):
        return out[0].numel() // out.shape[-1]
    return out[0, 0].numel()


def layer_macs(
    model: nn.Module, input_shape: tuple[int, int, int], run: Callable[[torch.Tensor], object] | None = None
) -> dict[str, int]:
    """{module name: MACs per image} of every conv and linear layer that the forward reaches, and of every attention
    layer's matmuls QK^T and AV (2 x query-key pairs x its q width: its packed q/k/v rows / 3)."""
    modules = dict(model.named_modules())
    pairs: dict[str, int] = {}
    macs = {name: modules[name].weight.numel() * n for name, n in layer_pixels(model, input_shape, run, pairs).items()}
    for name, n in pairs.items():
        macs[name] = 2 * n * modules[name].get_parameter(parts(modules[name])[0]).shape[0] // 3
    return macs


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """MACs of conv + linear layers for one image."""
    return sum(layer_macs(model, input_shape).values())


@torch.no_grad()
def mean_dynamic_macs(model: nn.Module, input_shape: tuple[int, int, int], batches) -> float:
    """Mean over the images of ``batches`` of the conv + linear MACs the model needs for each one (eval mode).

    Every layer counts statically (``layer_macs``) except one whose work depends on its input: a module with a
    ``per_image_macs`` attribute (channel gating's gated conv) gets a list there while the images run, and its
    forward appends the MACs it needed for each image of the batch (a tensor [N], same convention)."""
    dynamic = {name: m for name, m in model.named_modules() if hasattr(m, "per_image_macs")}
    fixed = sum(v for name, v in layer_macs(model, input_shape).items() if name not in dynamic)
    was_training = model.training
    model.eval()
    for m in dynamic.values():
        m.per_image_macs = []
    try:
        images = 0
        for x, _ in batches:
            model(x)
            images += len(x)
        used = sum(float(torch.cat(m.per_image_macs).sum()) for m in dynamic.values() if m.per_image_macs)
    finally:
        for m in dynamic.values():
            m.per_image_macs = None
        model.train(was_training)
    if images == 0:
        return float("nan")
    return fixed + used / images
