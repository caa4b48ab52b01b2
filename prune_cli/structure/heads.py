"""Attention modules at any head count and width: what torch's ``nn.MultiheadAttention`` and torchvision's Swin
(v1 and v2) and MaxViT attention modules become once pruned, or before (the pipeline's networks).

Those modules tie their attention width to their input width (``nn.MultiheadAttention``'s query to
``embed_dim``; Swin's heads have ``C // num_heads`` channels of the input's C and its output is reshaped to C;
MaxViT's reshapes to the input's D), so a pruned one, whose heads and head width no longer follow its input, is
rebuilt: :class:`HeadAttention`, :class:`WindowAttention` and :class:`GridAttention` compute what they do, with
their heads and width held as attributes and the scale of the unpruned module kept. Each applies its q/k/v and
output projections as ``Linear`` modules on a tensor of the input's layout ([B, N, C], Swin's padded map
[B, H, W, C], MaxViT's [B, G, P, D]), so a hook on them sees every token of an image along dim 0's image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WindowAttention(nn.Module):
    """Swin's shifted window attention (``cosine``: v2's, with ``logit_scale`` and the continuous position bias
    MLP ``cpb_mlp``) on [B, H, W, C], of ``num_heads`` heads of ``head_dim``."""

    def __init__(self, m: nn.Module, num_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.window_size, self.shift_size = list(m.window_size), list(m.shift_size)
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.attention_dropout, self.dropout = m.attention_dropout, m.dropout
        self.qkv, self.proj = m.qkv, m.proj
        self.cosine = hasattr(m, "cpb_mlp")
        if self.cosine:
            self.logit_scale, self.cpb_mlp = m.logit_scale, m.cpb_mlp
            self.register_buffer("relative_coords_table", m.relative_coords_table)
        else:
            self.relative_position_bias_table = m.relative_position_bias_table
        self.register_buffer("relative_position_index", m.relative_position_index)
        self.train(m.training)

    def position_bias(self) -> torch.Tensor:
        """[1, heads, N, N]: each head's bias between the N positions of a window."""
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads) if self.cosine else None
        table = table if table is not None else self.relative_position_bias_table
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        return 16 * torch.sigmoid(bias) if self.cosine else bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        ph, pw = x.shape[1], x.shape[2]
        shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        qkv = self.qkv(x)  # per position: as on the windows the positions are partitioned into
        if self.cosine and self.qkv.bias is not None:  # v2 has no key bias
            length = self.qkv.bias.numel() // 3
            qkv = qkv - F.pad(self.qkv.bias[length : 2 * length], (length, length))
        windows, n = (ph // wh) * (pw // ww), wh * ww
        qkv = qkv.view(b, ph // wh, wh, pw // ww, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b * windows, n, -1)
        q, k, v = qkv.reshape(b * windows, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.cosine:
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            scores = scores * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)
        scores = scores + self.position_bias()
        if sum(shift) > 0:
            scores = scores.view(b, windows, self.num_heads, n, n)
            scores = (scores + _shift_mask(x, ph, pw, self.window_size, shift).unsqueeze(1).unsqueeze(0)).flatten(0, 1)
        weights = F.dropout(F.softmax(scores, dim=-1), p=self.attention_dropout, training=self.training)
        x = (weights @ v).transpose(1, 2).reshape(b, ph // wh, pw // ww, wh, ww, -1)
        x = self.proj(x.permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1))
        x = F.dropout(x, p=self.dropout, training=self.training)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()


def _shift_mask(x: torch.Tensor, ph: int, pw: int, window: list[int], shift: list[int]) -> torch.Tensor:
    """[windows, N, N]: -100 between two positions of a shifted window that come from different regions, else 0."""
    region = x.new_zeros((ph, pw))
    count = 0
    for top, bottom in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for left, right in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[top:bottom, left:right] = count
            count += 1
    region = region.view(ph // window[0], window[0], pw // window[1], window[1]).permute(0, 2, 1, 3)
    region = region.reshape(-1, window[0] * window[1])
    differ = region.unsqueeze(1) - region.unsqueeze(2)
    return differ.masked_fill(differ != 0, -100.0).masked_fill(differ == 0, 0.0)


class GridAttention(nn.Module):
    """MaxViT's relative positional attention on [B, G, P, D] (G windows or grid cells of P positions), of
    ``n_heads`` heads of ``head_dim``; its keys scaled by the unpruned module's ``scale_factor``."""

    def __init__(self, m: nn.Module, n_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.n_heads, self.head_dim, self.scale_factor = n_heads, head_dim, scale
        self.size, self.max_seq_len = m.size, m.max_seq_len
        self.to_qkv, self.merge = m.to_qkv, m.merge
        self.relative_position_bias_table = m.relative_position_bias_table
        self.register_buffer("relative_position_index", m.relative_position_index)
        self.train(m.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        q, k, v = (t.reshape(b, g, p, self.n_heads, self.head_dim).transpose(2, 3) for t in self.to_qkv(x).chunk(3, -1))
        index = self.relative_position_index.view(-1)
        bias = self.relative_position_bias_table[index].view(self.max_seq_len, self.max_seq_len, -1)
        scores = q @ (k * self.scale_factor).transpose(-2, -1) + bias.permute(2, 0, 1).unsqueeze(0)
        out = F.softmax(scores, dim=-1) @ v
        return self.merge(out.transpose(2, 3).reshape(b, g, p, -1))


class HeadAttention(nn.Module):
    """Attention of ``num_heads`` heads of ``head_dim`` on ``embed_dim`` inputs and outputs: ``qkv`` and ``proj``
    linear layers at any widths and a fixed ``scale``; called as ``nn.MultiheadAttention`` is (query, key, value,
    ...), it returns (output, head-averaged attention weights or None)."""

    def __init__(self, m: nn.Module, num_heads: int, head_dim: int, scale: float):
        """Of a ``nn.MultiheadAttention`` ``m``'s tensors (packed ``in_proj_weight``, sliced or not) or another
        :class:`HeadAttention`'s, its heads and width given, the original scale kept."""
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.batch_first, self.dropout = m.batch_first, m.dropout
        if isinstance(m, HeadAttention):
            self.qkv = m.qkv
        else:
            weight, bias = m.in_proj_weight, m.in_proj_bias
            self.qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
            self.qkv.weight, self.qkv.bias = weight, bias
        self.proj = m.proj if isinstance(m, HeadAttention) else m.out_proj
        self.train(m.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        inputs = [query, key, value]
        if not batched:  # [N, E]: one sequence
            inputs = [t.unsqueeze(0) for t in inputs]
        elif not self.batch_first:  # [N, B, E]
            inputs = [t.transpose(0, 1) for t in inputs]
        if query is key and key is value:  # self-attention: one projection of the tokens
            q, k, v = self.qkv(inputs[0]).chunk(3, -1)
        else:
            weights = self.qkv.weight.chunk(3)
            biases = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None, None, None)
            q, k, v = (F.linear(t, w, b) for t, w, b in zip(inputs, weights, biases))
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        scores = scores + _additive(attn_mask, key_padding_mask, is_causal, scores)
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = self.proj(torch.matmul(weights, v).transpose(1, 2).flatten(2))  # [B, N, heads x width] in
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


def _additive(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool, scores: torch.Tensor
) -> torch.Tensor:
    """The masks as one additive term on the scores [B, heads, N, M] (a bool mask: True is masked out)."""
    add = torch.zeros((), dtype=scores.dtype, device=scores.device)
    n, s = scores.shape[-2], scores.shape[-1]
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(n, s, dtype=torch.bool, device=scores.device).triu(1)
    if attn_mask is not None:
        add = add + _as_scores(attn_mask if attn_mask.dim() == 2 else attn_mask.view(scores.shape[0], -1, n, s), scores)
    if key_padding_mask is not None:
        add = add + _as_scores(key_padding_mask.view(scores.shape[0], 1, 1, s), scores)
    return add


def _as_scores(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """A mask as a term added to the scores: a bool mask's True is -inf (masked out), a float one is added."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=scores.dtype).masked_fill(mask, -math.inf)
    return mask.to(scores.dtype)
