"""PFS gates and Neuron Merging on channel groups several layers hold (prune.residual=true): a residual stream's
channel gated once at every BatchNorm holding it, and merged with all its producers' filters into every consumer,
against explicit loops over the group's slots."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from helpers import TINY, calibrated, compose_config
from prune_cli.methods.pfs.gates import Gates, train_gates
from prune_cli.methods.pfs.selection import select_top_gates
from prune_cli.models import build_model, with_shared_groups
from prune_cli.run import pipeline
from prune_cli.structure.channels import mask_channels, prune_channels, structure

SHAPE = (3, 8, 8)
STEM = "conv1"  # option A: the stem's stream runs through all three stages, at an offset in the later ones


@pytest.fixture(scope="module")
def streams():
    """A ResNet-20 (widths 4-8-16, option-A shortcuts) with realistic BN statistics, its streams offered as groups."""
    dense = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3, "shortcut": "A", "width_mult": 0.25})
    return with_shared_groups(calibrated(dense, SHAPE), SHAPE)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def group_index(model, name: str) -> int:
    return next(i for i, g in enumerate(model.channel_groups()) if g.name == name)


def where(slot, c: int) -> tuple[int, ...]:
    """The positions of the group's channel c in the slot's layer."""
    return (c,) if slot.positions is None else slot.positions[c]


# ------------------------------------------------------------------ PFS gates


def test_pfs_gates_a_stream_once_everywhere_and_its_architecture_prunes(streams):
    """Gates trained a few steps on the frozen init; the top gates prune the stem's stream in every layer holding it,
    and the network gated 0/1 at every BatchNorm equals the masked and the pruned one, in train and eval mode."""
    model = copy.deepcopy(streams).train()
    gates = Gates(model)
    assert [p.numel() for p in gates.params] == model.widths
    batches = [(images(8, 2 + e), torch.arange(8) % 10) for e in range(2)]
    before = [p.detach().clone() for p in model.parameters()]
    result = train_gates(model, gates, lambda e: batches[e : e + 1], lambda m: 0.0, epochs=2, lr=0.2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the weights stay at init
    assert len(result["history"]) == 2 and any(not torch.all(v == 1) for v in result["gates"])  # the gates moved
    gates.remove()
    counted = structure(model, SHAPE)
    keep, info = select_top_gates(result["gates"], counted, counted.count(model.widths)[1], 0.5)
    stem = group_index(model, STEM)
    removed = len(keep[stem]) - int(keep[stem].sum())
    assert info["met"] and 0 < removed < len(keep[stem])

    x = images(8, 1)
    for training in (True, False):
        masked, gated = copy.deepcopy(model).train(training), copy.deepcopy(model).train(training)
        mask_channels(masked, keep)
        pruned = prune_channels(masked, keep)
        assert pruned.training == training
        binary = Gates(gated)
        binary.load_([k.float() for k in keep])
        with torch.no_grad():
            want = pruned(x)
            torch.testing.assert_close(masked(x), want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gated(x), want, rtol=1e-4, atol=1e-5)
    dense_modules, pruned_modules = dict(model.named_modules()), dict(pruned.named_modules())
    gone = {}  # (layer, dim) -> positions removed there, by every group
    for group, k in zip(model.channel_groups(), keep):
        for slot in group.slots:
            key = (slot.module, slot.dim)
            gone[key] = gone.get(key, 0) + (len(k) - int(k.sum())) * len(where(slot, 0))
    for slot in model.channel_groups()[stem].slots:  # every layer holding the stream lost its removed channels
        size = dense_modules[slot.module].weight.shape[slot.dim] - gone[slot.module, slot.dim]
        assert pruned_modules[slot.module].weight.shape[slot.dim] == size


def test_schedule_pfs_prunes_the_streams_with_prune_residual(tmp_path):
    """The gates stage takes shared groups (it used to refuse them): the stem's stream loses channels and the MACs
    reduction, against the standard ResNet-20 (the 0.25-wide one is 93.5% below it already), is met."""
    tiny = [*TINY, "model.width_mult=0.25", "model.shortcut=A", "dataset.val_split=32", "prune.target=macs"]
    epochs = ["schedule.gates.epochs=1", "schedule.scratch.epochs=1"]
    rows = pipeline.run(
        compose_config(*tiny, *epochs, "schedule=pfs", "prune.residual=true", "prune.ratio=0.96"), tmp_path
    )
    assert [r["stage"] for r in rows] == ["init", "gates", "scratch"]
    standard = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3})
    reference = structure(standard, (3, 16, 16)).count(standard.widths)[1]
    assert abs(1 - rows[1]["macs"] / reference - 0.96) <= 1e-3 * 0.96 and rows[2]["macs"] == rows[1]["macs"]
    layers = pd.read_csv(tmp_path / "layers.csv").set_index("layer")
    assert layers.loc[STEM, "after"] < layers.loc[STEM, "before"] == 4
