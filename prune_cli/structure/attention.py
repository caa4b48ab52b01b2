"""Attention layers the channel graph prunes by whole heads or by head width: which modules it knows, where their
heads sit in their tensors, and the module a pruned one becomes.

The forms known (``form``), each as self-attention on a channels-last input:

- ``nn.MultiheadAttention`` (query, key and value one tensor; packed ``in_proj_weight``, no ``bias_k`` /
  ``bias_v`` or zero attention) on [B, N, E]: its rows are q, k and v, each ``num_heads`` blocks of ``head_dim``;
  ``out_proj`` reads the heads' outputs in that order. It ties its widths (the query's to ``embed_dim``, every
  head's to ``embed_dim // num_heads``), so once pruned it is rebuilt as :class:`HeadAttention` of its tensors (as
  ``qkv`` and ``proj`` linear layers) at any widths;
- torchvision's Swin (v1, v2) window attention on [B, H, W, C] and MaxViT's on [B, G, P, D]: their ``qkv`` /
  ``to_qkv`` and ``proj`` / ``merge`` linear layers laid out as above; they tie their heads' width to their
  input's, so once pruned they are rebuilt (``windows.py``); their per-head tensors (relative position bias
  tables, Swin v2's logit scale and its position bias MLP's outputs) go with their heads;
- the common ``qkv`` form: a module with a ``qkv`` linear layer (rows q, k, v, each ``num_heads`` x ``head_dim``),
  a ``proj`` linear layer reading the heads, and the ints ``num_heads`` and ``head_dim`` its forward uses (as
  timm's and many papers' ViT blocks do): pruned in place, those attributes rewritten (``head_width`` only with
  a float ``scale`` attribute, which stays: else its scale would follow the width).

A *unit* is what goes at once: a whole head (q, k and v rows of that head, and the output projection's columns
reading it: ``attention="heads"``) or one position of every head (``"head_width"``: q, k and v rows j of every
head, so all heads keep one width). The scale stays the unpruned network's: removing a head changes no other
head's scores, and removing position j of q and k removes exactly its term of every score (Swin v2's cosine
attention normalises q and k, and a zero entry adds nothing to a norm). So zeroing a unit's q, k and v rows gives
that unit's output 0 and leaves every other one as it was: the masked network is the pruned one.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from prune_cli.structure.heads import GridAttention, HeadAttention, WindowAttention

MODES = ("heads", "head_width", "none")
TORCHVISION = {  # torchvision's window attention modules (by their own class: their forward is known)
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"): "swin",
    ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"): "swin",
    ("torchvision.models.maxvit", "RelativePositionalMultiHeadAttention"): "maxvit",
}
# per form: (the packed q/k/v weight, the output projection, the attribute counting the heads, the input's dims)
PARTS = {
    "multihead": ("in_proj_weight", "out_proj", "num_heads", 3),
    "head": ("qkv.weight", "proj", "num_heads", 3),
    "qkv": ("qkv.weight", "proj", "num_heads", 3),
    "swin": ("qkv.weight", "proj", "num_heads", 4),
    "maxvit": ("to_qkv.weight", "merge", "n_heads", 4),
}
REBUILDS = {"multihead": HeadAttention, "swin": WindowAttention, "maxvit": GridAttention}  # what a pruned one becomes
REBUILT = tuple(REBUILDS.values())  # ours: pruned by rewriting their heads and width


def form(m: nn.Module) -> str | None:
    """Which known attention form ``m`` is: ``"multihead"`` (torch's), ``"head"`` (:class:`HeadAttention`),
    ``"swin"``, ``"maxvit"``, ``"qkv"`` or None."""
    if isinstance(m, nn.MultiheadAttention):
        return "multihead"
    for cls, kind in zip(REBUILT, ("head", "swin", "maxvit")):
        if isinstance(m, cls):
            return kind
    known = TORCHVISION.get((type(m).__module__, type(m).__name__))
    if known is not None:
        return known
    ints = all(isinstance(getattr(m, a, None), int) for a in ("num_heads", "head_dim"))
    linears = all(isinstance(getattr(m, a, None), nn.Linear) for a in ("qkv", "proj"))
    return "qkv" if ints and linears else None


def parts(m: nn.Module) -> tuple[str, str, int, int]:
    """(the packed q/k/v weight's name, the output projection's module name, heads, head width) of a known form."""
    kind = form(m)
    weight, proj, count, _ = PARTS[kind]
    heads = getattr(m, count)
    width = m.qkv.in_features // heads if kind == "swin" and not isinstance(m, WindowAttention) else m.head_dim
    return weight, proj, heads, width


def per_head(m: nn.Module) -> list[tuple[str, str, int]]:
    """The tensors of ``m`` holding one entry per head, beside q, k and v: (module, name, dim) relative to ``m``
    (relative position bias tables; Swin v2's logit scale and its position bias MLP's last layer)."""
    kind = form(m)
    if kind == "maxvit" or (kind == "swin" and not hasattr(m, "cpb_mlp")):
        return [("", "relative_position_bias_table", 1)]
    if kind == "swin":
        last = [("cpb_mlp.2", name, 0) for name in ("weight", "bias") if getattr(m.cpb_mlp[2], name) is not None]
        return [("", "logit_scale", 0), *last]
    return []


def tokens(m: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """(tokens its projections run on, query x key pairs its matmuls compute), per image of input ``shape``: one
    sequence of N tokens ([B, N, E]: N, N x N), Swin's windows of its padded map, MaxViT's G groups of P."""
    kind = form(m)
    if kind == "swin":
        (wh, ww), (h, w) = m.window_size, shape[1:3]
        padded = -(-h // wh) * wh * -(-w // ww) * ww
        return padded, padded * wh * ww
    if kind == "maxvit":
        return shape[1] * shape[2], shape[1] * shape[2] ** 2
    n = shape[1] if kind == "qkv" or m.batch_first else shape[0]
    return n, n * n


def refusal(m: nn.Module, node, query, mode: str) -> str | None:
    """Why the call ``node`` of the attention module ``m`` on ``query`` cannot be pruned in ``mode`` (None: it can)."""
    kind = form(m)
    if kind in ("multihead", "head"):
        key = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
        why = _unpacked(m) if kind == "multihead" else None
        return why or (None if key is query and value is query else "cross-attention: another key or value")
    if len(node.args) + len(node.kwargs) != 1:
        return "called with more than its input"
    if kind == "qkv" and mode == "head_width" and not isinstance(getattr(m, "scale", None), float):
        return "head_width needs a float scale attribute, else the scale would follow the pruned width"
    return None


def scale(m: nn.Module) -> float:
    """The factor of the scores q . k of the unpruned module (Swin v2's cosine attention has its logit scale)."""
    own = getattr(m, "scale_factor" if form(m) == "maxvit" else "scale", None)
    return own if isinstance(own, float) else parts(m)[3] ** -0.5


def ours(net: nn.Module) -> nn.Module:
    """``net`` with every torch or torchvision attention module of a known form replaced, in place, by ours of
    the same tensors, heads, width and scale (it computes the same; its projections are modules a hook sees)."""
    for name, m in list(net.named_modules()):
        kind = form(m)
        if kind not in ("multihead", "swin", "maxvit") or isinstance(m, REBUILT):
            continue
        if kind == "multihead" and _unpacked(m):
            continue  # a form the graph leaves whole
        heads, width = parts(m)[2:]
        _replace(net, name, REBUILDS[kind](m, heads, width, scale(m)))
    return net


def _unpacked(m: nn.MultiheadAttention) -> str | None:
    """Why torch's multi-head attention ``m`` is no packed self-attention the graph maps (None: it is)."""
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        return "separate q, k and v input widths"
    if m.bias_k is not None or m.add_zero_attn:
        return "bias_k / bias_v or add_zero_attn"
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def unit_rows(units: np.ndarray, mode: str, heads: int, width: int) -> np.ndarray:
    """The unit of every row of one of q, k, v ([heads, width], head-major): a head's ``width`` rows are that
    head's unit (``heads``), or row j of every head is unit j (``head_width``)."""
    if mode == "heads":
        return np.repeat(units, width)
    return np.tile(units, heads)


def resize(model: nn.Module, name: str, heads: int, width: int, original: tuple[int, int, float]) -> None:
    """After surgery sliced its tensors, the attention module ``name`` of ``model`` holds ``heads`` heads of
    ``width`` (``original``: its heads, width and scale unpruned): ours and the ``qkv`` form get the new head
    count and width; a torch or torchvision module whose widths no longer tie as its code needs is rebuilt as ours
    of its tensors, the scale kept."""
    m = model.get_submodule(name)
    kind = form(m)
    if kind == "qkv" or isinstance(m, REBUILT):
        setattr(m, PARTS[kind][2], heads)
        m.head_dim = width
        return
    weight, proj, _, _ = PARTS[kind]
    inputs = m.get_parameter(weight).shape[1]
    outputs = m.get_submodule(proj).weight.shape[0]
    if (heads, width) == original[:2] and inputs == outputs == heads * width:
        return  # nothing went (Swin's width and scale follow its input's: that must stay too)
    _replace(model, name, REBUILDS[kind](m, heads, width, original[2]))
