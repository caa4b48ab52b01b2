"""Vision transformers through the pipeline (``model=custom`` / ``model=torchvision``): their attention layers
become ours (qkv / proj linear layers), whose heads (``prune.attention=heads``) or head widths (``head_width``)
are channel groups the stages prune like any other: counted as the graph counts (attention's matmuls included),
masked exactly equal to pruned for the attention units, the surgery equal to the graph's masked network, and
the pruned network rebuilt from its arch as ``prune_cli.load`` and resume do."""

from __future__ import annotations

import sys
import types
from functools import partial

import pytest
import torch

from helpers import TINY, compose_config, maxvit, swin, tiny_vit
from prune_cli.core.checkpoint import load_checkpoint
from prune_cli.core.trust import trusting
from prune_cli.models import build_model, with_shared_groups
from prune_cli.models.graphnet import graph_groups
from prune_cli.run import pipeline
from prune_cli.structure.channels import mask_channels, prune_channels, structure
from prune_cli.structure.graph import ChannelGraph
from prune_cli.structure.heads import GridAttention, HeadAttention, WindowAttention

NETWORKS = {  # builder, image side
    "vit": (partial(tiny_vit, num_classes=10), 16),
    "swin_v2": (partial(swin, True), 32),
    "maxvit": (maxvit, 32),
}


def build(name: str, monkeypatch, attention: str = "heads"):
    """The network as ``model=custom`` builds it, every group of its graph offered, attention by ``attention``."""
    factory, side = NETWORKS[name]
    monkeypatch.setitem(sys.modules, f"tiny_{name}_mod", types.SimpleNamespace(Net=lambda num_classes=10: factory()))
    target = f"tiny_{name}_mod:Net"
    with trusting([target]):
        arch = {"name": "custom", "target": target, "image_size": side, "num_classes": 10, "in_channels": 3}
        model = build_model(arch)
        return with_shared_groups(model, (3, side, side), attention).eval(), side


def images(side: int) -> torch.Tensor:
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))


def unit_groups(model) -> list[int]:
    """The indexes of the groups of attention units (their producer: an attention's q/k/v projection)."""
    modules = dict(model.named_modules())
    owners = {
        f"{n}.{'to_qkv' if isinstance(m, GridAttention) else 'qkv'}"
        for n, m in modules.items()
        if isinstance(m, HeadAttention | WindowAttention | GridAttention)
    }
    return [i for i, g in enumerate(model.channel_groups()) if g.role("producer")[0].module in owners]


@pytest.mark.parametrize("attention", ["heads", "head_width"])
@pytest.mark.parametrize("name", NETWORKS)
def test_every_channel_is_offered_counted_and_pruned_as_the_graph_does(name, attention, monkeypatch):
    model, side = build(name, monkeypatch, attention)
    graph = model._graph(model.net)
    # every prunable channel is offered, but for a classifier's hidden linear layer (MaxViT's head: 32 units)
    head = sum(len(g.channels) for g in graph.groups if g.name.startswith("classifier"))
    assert sum(model.widths) == sum(len(g.channels) for g in graph.groups) - head
    assert head == (32 if name == "maxvit" else 0)
    counts = structure(model, (3, side, side))
    assert counts.count(model.widths) == graph.count(set())
    keep = [torch.arange(w) % 3 != 1 for w in model.widths]  # a third of every group
    pruned = prune_channels(model, keep)
    assert counts.count([int(k.sum()) for k in keep]) == structure(pruned, (3, side, side)).count(pruned.widths)
    removed = {c for (_, order), k in zip(graph_groups(graph, True), keep) for c, kept in zip(order, k) if not kept}
    x = images(side)
    with torch.no_grad():  # the surgery is the graph's: equal to its masked network
        a, b = pruned(x), graph.masked(removed)(x)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    rebuilt = build_model(pruned.arch)  # what load and resume do
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), a)


@pytest.mark.parametrize("name", NETWORKS)
def test_masking_heads_is_removing_them(name, monkeypatch):
    model, side = build(name, monkeypatch)
    units = unit_groups(model)
    assert units
    keep = [torch.ones(w, dtype=torch.bool) for w in model.widths]
    for g in units:
        keep[g][0] = False
    x = images(side)
    pruned = prune_channels(model, keep)
    mask_channels(model, keep)
    with torch.no_grad():
        a, b = pruned.eval()(x), model(x)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


VIT_FILE = """
from torchvision.models.vision_transformer import VisionTransformer


def Net(num_classes=10):
    return VisionTransformer(16, 8, 2, 4, 16, 24, num_classes=num_classes)
"""


def test_the_pipeline_prunes_a_vits_head_width_and_counts_it(tmp_path, monkeypatch):
    """prune.attention=head_width through the command line's pipeline: half the params go, every attention layer
    keeps its 4 heads at a smaller width, the table counts the finetuned network as its graph does."""
    (tmp_path / "tiny_vit_net.py").write_text(VIT_FILE)
    monkeypatch.chdir(tmp_path)
    run = [*TINY, "model=custom", "model.target=tiny_vit_net:Net", "prune.attention=head_width", "prune.scope=global"]
    run += ["schedule.pretrain.epochs=1", "schedule.finetune.epochs=1"]
    with trusting(["tiny_vit_net:Net"]):
        rows = {row["stage"]: row for row in pipeline.run(compose_config(*run), tmp_path / "run")}
        net = build_model(load_checkpoint(tmp_path / "run" / "checkpoints" / "finetune.pt")["arch"]).net
    assert abs(1 - rows["prune"]["params"] / rows["pretrain"]["params"] - 0.5) <= 0.01
    layers = [layer.self_attention for layer in net.encoder.layers]
    assert all(isinstance(a, HeadAttention) and a.num_heads == 4 and a.head_dim <= 4 for a in layers)
    count = ChannelGraph(net, torch.zeros(2, 3, 16, 16)).count(set())
    assert (rows["finetune"]["params"], rows["finetune"]["macs"]) == count
