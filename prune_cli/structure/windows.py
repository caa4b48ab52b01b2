"""Window attention at any head count and width: what torchvision's Swin (v1 and v2) and MaxViT attention modules
become once pruned.

torchvision's modules tie their attention width to their input width (Swin's heads have ``C // num_heads``
channels of the input's C and its output is reshaped to C; MaxViT's reshapes to the input's D), so a pruned
module, whose heads and head width no longer follow its input, is rebuilt: :class:`WindowAttention` and
:class:`GridAttention` compute what torchvision's do, with the same tensors under the same names, but with their
heads and width held as attributes and the scale of the unpruned module kept.
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
        b, h, w, c = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        ph, pw = x.shape[1], x.shape[2]
        shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = (ph // wh) * (pw // ww)
        x = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * windows, wh * ww, c)
        bias = self.qkv.bias
        if self.cosine and bias is not None:  # v2 has no key bias
            length = bias.numel() // 3
            bias = torch.cat([bias[:length], torch.zeros_like(bias[length : 2 * length]), bias[2 * length :]])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(x.size(0), x.size(1), 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if self.cosine:
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            scores = scores * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)
        scores = scores + self.position_bias()
        if sum(shift) > 0:
            scores = scores.view(b, windows, self.num_heads, x.size(1), x.size(1))
            scores = (scores + _shift_mask(x, ph, pw, self.window_size, shift).unsqueeze(1).unsqueeze(0)).flatten(0, 1)
        weights = F.dropout(F.softmax(scores, dim=-1), p=self.attention_dropout, training=self.training)
        x = (weights @ v).transpose(1, 2).reshape(x.size(0), x.size(1), -1)
        x = F.dropout(F.linear(x, self.proj.weight, self.proj.bias), p=self.dropout, training=self.training)
        x = x.view(b, ph // wh, pw // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1)
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
