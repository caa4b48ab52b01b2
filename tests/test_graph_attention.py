"""Vision transformers pruned whole: the embedding stream as one group (patch embedding, class token, position
embedding, every norm and projection, the head), the MLPs' hidden units, and attention by whole heads or by head
width. The pruned network equals the masked one, its params and MACs (attention's matmuls included) equal a count
from its modules, and the rebuilt attention modules hold the heads and widths that were kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prune_cli
from helpers import maxvit, randomized, removal, shape_count, swin, tiny_vit
from prune_cli.structure.any_network import channel_scores, select
from prune_cli.structure.attention import form, ours, parts
from prune_cli.structure.graph import ChannelGraph
from prune_cli.structure.heads import GridAttention, HeadAttention, WindowAttention

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class QkvAttention(nn.Module):
    """Self-attention in the common qkv form: ``qkv`` and ``proj`` linear layers, ``num_heads`` and ``head_dim``
    used by the forward, a stored ``scale``."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, head_dim**-0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * num_heads * head_dim), nn.Linear(num_heads * head_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, -1))


class QkvViT(nn.Module):
    """Patches, one pre-norm block with :class:`QkvAttention` and an MLP, mean over tokens, a head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 12, 4, stride=4)
        self.norm1, self.attn = nn.LayerNorm(12), QkvAttention(12, num_heads=3, head_dim=4)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(12), nn.Linear(12, 20), nn.Linear(20, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


def assert_masked_equals_pruned(graph: ChannelGraph, removed: set[int], pruned: nn.Module, x: torch.Tensor):
    masked = graph.masked(removed)
    for mode in ("eval", "train"):  # dropout 0: the modes differ in nothing random
        with torch.no_grad():
            a, b = getattr(pruned, mode)()(x), getattr(masked, mode)()(x)
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), mode


@pytest.mark.parametrize("attention", ["heads", "head_width"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_a_vit_prunes_everything_but_its_input_and_logits(attention, ratio):
    model = tiny_vit()
    pruned, table = prune_cli.prune(model, X, ratio, attention=attention)
    channels = 3 + 16 + 2 * (4 + 24) + 1000  # the image's, the stream, per block: the units and the MLP, the logits
    assert table["unprunable_share"] == pytest.approx((3 + 1000) / channels) and not table["warnings"]
    assert table["params_removed"] == pytest.approx(ratio, abs=0.02)
    graph = ChannelGraph(model, X, attention)
    removed = select(graph, ratio)
    assert_masked_equals_pruned(graph, removed, pruned, X)
    assert (table["params"], table["macs"]) == shape_count(model, X)
    assert (table["params_pruned"], table["macs_pruned"]) == shape_count(pruned, X)
    width = pruned.hidden_dim
    assert pruned.conv_proj.out_channels == pruned.class_token.shape[-1] == pruned.encoder.ln.weight.shape[0] == width
    for layer, units in zip(pruned.encoder.layers, (g for g in graph.groups if g.name.endswith("self_attention"))):
        kept = sum(c not in removed for c in units.channels)
        attn = layer.self_attention
        assert isinstance(attn, HeadAttention) and attn.scale == 4**-0.5  # the scale of the original width
        assert (attn.num_heads, attn.head_dim) == ((kept, 4) if attention == "heads" else (4, kept))
        assert attn.qkv.weight.shape == (3 * attn.num_heads * attn.head_dim, width)


WINDOWED = {"swin": (lambda: swin(False), WindowAttention), "swin_v2": (lambda: swin(True), WindowAttention)}
WINDOWED["maxvit"] = (maxvit, GridAttention)


@pytest.mark.parametrize("attention", ["heads", "head_width"])
@pytest.mark.parametrize("name", WINDOWED)
def test_window_attention_networks_prune_whole(name, attention):
    """Swin v1 / v2 (relative position bias table; logit scale and position bias MLP) and MaxViT: only the image's
    and the logits' channels stay; half of every group pruned equals the masked network, counts match."""
    build, rebuilt = WINDOWED[name]
    torch.manual_seed(0)
    model, x = randomized(build()), torch.randn(2, 3, 32, 32)
    graph = ChannelGraph(model, x, attention)
    assert set(graph.share_unprunable()[1]) == {"the network's input", "the network's output"}
    for ratio in (0.3, 0.5):  # of the params, as prune_cli.prune selects
        chosen = select(graph, ratio)
        assert 1 - graph.count(chosen)[0] / graph.count(set())[0] == pytest.approx(ratio, abs=0.01)
        assert_masked_equals_pruned(graph, chosen, graph.pruned(chosen), x)
    removed = removal(graph)  # half of every group: every attention layer loses units
    pruned = graph.pruned(removed)
    assert_masked_equals_pruned(graph, removed, pruned, x)
    assert graph.count(removed) == shape_count(pruned, x) and graph.count(set()) == shape_count(model, x)
    layers = [m for m in pruned.modules() if isinstance(m, rebuilt)]
    before = [parts(m)[2:] for m in model.modules() if form(m) is not None]
    after = [parts(m)[2:] for m in layers]
    assert len(after) == len(before) and all(
        (h < h0 and w == w0) if attention == "heads" else (h == h0 and w < w0)
        for (h, w), (h0, w0) in zip(after, before)
    )
    heads = [h for h, _ in after]
    tables = [
        m.cpb_mlp[2].out_features if name == "swin_v2" else m.relative_position_bias_table.shape[1] for m in layers
    ]
    assert heads == tables  # the per-head tensors went with their heads


def test_the_qkv_form_has_its_heads_and_width_rewritten_and_keeps_its_scale():
    torch.manual_seed(0)
    model, x = randomized(QkvViT()), torch.randn(2, 3, 8, 8)
    graph = ChannelGraph(model, x)  # patches flattened to tokens, a mean over them: the stream prunes too
    assert [(g.name, len(g.channels)) for g in graph.groups] == [("patch", 12), ("attn.qkv", 3), ("fc1", 20)]
    removed = removal(graph)
    assert_masked_equals_pruned(graph, removed, graph.pruned(removed), x)
    for attention, removed_units, expected in (("heads", [1], (2, 4)), ("head_width", [0, 3], (3, 2))):
        graph = ChannelGraph(model, x, attention)
        units = next(g for g in graph.groups if g.name == "attn.qkv").channels
        removed = {units[i] for i in removed_units}
        pruned = graph.pruned(removed)
        assert (pruned.attn.num_heads, pruned.attn.head_dim, pruned.attn.scale) == (*expected, 4**-0.5)
        assert pruned.attn.qkv.out_features == 3 * expected[0] * expected[1] == 3 * pruned.attn.proj.in_features
        assert_masked_equals_pruned(graph, removed, pruned, x)
        assert graph.count(removed) == shape_count(pruned, x)
    # a whole head by hand: its q, k, v rows and the projection's columns gone, the rest as they were
    graph = ChannelGraph(model, x, "heads")
    units = next(g for g in graph.groups if g.name == "attn.qkv").channels
    pruned = graph.pruned({units[1]})
    rows = [r for block in range(3) for r in range(block * 12, block * 12 + 12) if not 4 <= r - block * 12 < 8]
    assert torch.equal(pruned.attn.qkv.weight, model.attn.qkv.weight[rows])
    assert torch.equal(pruned.attn.proj.weight, model.attn.proj.weight[:, [0, 1, 2, 3, 8, 9, 10, 11]])


def test_a_heads_score_is_the_sum_over_its_rows():
    model = tiny_vit()
    graph = ChannelGraph(model, X, "heads")
    scores = channel_scores(graph)
    attn = model.encoder.layers[0].self_attention
    norms = attn.in_proj_weight.detach().abs().sum(1)
    units = next(g for g in graph.groups if g.name.endswith("layer_0.self_attention")).channels
    sums = [sum(norms[block * 16 + head * 4 + j].item() for block in range(3) for j in range(4)) for head in range(4)]
    for head, unit in enumerate(units):  # the sum over its 12 rows, over the layer's mean head sum
        assert scores[unit] == pytest.approx(sums[head] / (sum(sums) / 4), rel=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_attention_computes_what_multihead_attention_does(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first).eval()
    nn.init.normal_(mha.in_proj_bias)
    ours = HeadAttention(mha, 3, 4, 4**-0.5).eval()
    x = torch.randn(2, 5, 12) if batch_first else torch.randn(5, 2, 12)
    padding = torch.tensor([[False] * 4 + [True], [False] * 5])
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": causal}):
        expected, weights = mha(x, x, x, **kwargs)
        got, our_weights = ours(x, x, x, **kwargs)
        assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(our_weights, weights, atol=1e-6)


def test_attention_none_keeps_every_head_and_unknown_modes_are_refused():
    model = tiny_vit()
    pruned, table = prune_cli.prune(model, X, 0.3, attention="none")
    assert all(
        type(layer.self_attention) is nn.MultiheadAttention or layer.self_attention.num_heads == 4
        for layer in pruned.encoder.layers
    )
    assert (
        table["unprunable_reasons"].get(
            "attention heads kept whole (attention='none', encoder.layers.encoder_layer_0.self_attention)"
        )
        == 16
    )
    with pytest.raises(ValueError, match="attention must be one of"):
        prune_cli.prune(model, X, 0.3, attention="rows")


@pytest.mark.parametrize("name", ["vit", "swin_v2", "maxvit"])
def test_a_pruned_transformer_exports_to_onnx_and_torchscript_with_equal_outputs(tmp_path, name):
    onnxruntime = pytest.importorskip("onnxruntime")
    build = tiny_vit if name == "vit" else WINDOWED[name][0]
    torch.manual_seed(0)
    x = X if name == "vit" else torch.randn(2, 3, 32, 32)
    pruned, _ = prune_cli.prune(randomized(build()), x, 0.5, attention="head_width" if name == "maxvit" else "heads")
    path = tmp_path / "net.onnx"
    torch.onnx.export(pruned.eval(), (x,), str(path), input_names=["input"], opset_version=17, dynamo=False)
    got = onnxruntime.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = pruned(x)
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4 * float(expected.abs().max()))
    traced = torch.jit.trace(pruned, x, check_trace=False)
    assert torch.allclose(traced(x), expected, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("name", ["vit", *WINDOWED])
def test_our_attention_modules_compute_what_torch_and_torchvision_compute(name):
    """``ours`` replaces every known attention module by ours, of the same tensors: the same outputs, and the
    graph of the replaced network has the same groups and counts."""
    build = tiny_vit if name == "vit" else WINDOWED[name][0]
    torch.manual_seed(0)
    model, x = randomized(build()), X if name == "vit" else torch.randn(2, 3, 32, 32)
    replaced = ours(copy.deepcopy(model))
    assert any(isinstance(m, HeadAttention | WindowAttention | GridAttention) for m in replaced.modules())
    with torch.no_grad():
        assert torch.allclose(replaced(x), model(x), atol=1e-5)
    graph, theirs = ChannelGraph(replaced, x), ChannelGraph(model, x)
    assert [len(g.channels) for g in graph.groups] == [len(g.channels) for g in theirs.groups]
    assert graph.count(set()) == theirs.count(set()) == shape_count(replaced, x)
