"""A new stage, criterion and model family registered from here, without editing prune_cli, run through
``prune-cli``: the hub resolves them by name like the built-in ones."""

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from helpers import TINY
from prune_cli.cli.run import main
from prune_cli.core.options import Str
from prune_cli.importance.criteria import CRITERIA, Criterion
from prune_cli.models import MODELS, Prunable
from prune_cli.models.base import WIDTH_MULT
from prune_cli.stages import STAGES, Stage
from prune_cli.structure.groups import ChannelGroup

EXTENSION_CONF = Path(__file__).resolve().parent / "extension_conf"  # the YAML of the parts registered here


@MODELS.register("twoconv")
class TwoConv(Prunable):
    def __init__(self, name, num_classes, in_channels, widths=None, width_mult=1.0):
        super().__init__()
        widths = widths or [round(8 * width_mult), round(16 * width_mult)]
        self.arch = dict(
            name=name, num_classes=num_classes, in_channels=in_channels, widths=list(widths), width_mult=width_mult
        )
        self.conv1, self.bn1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0])
        self.conv2, self.bn2 = nn.Conv2d(widths[0], widths[1], 3, padding=1, bias=False), nn.BatchNorm2d(widths[1])
        self.fc = nn.Linear(widths[1], num_classes)

    @classmethod
    def options_for(cls, name):
        return (WIDTH_MULT,)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))

    def channel_groups(self):
        return [ChannelGroup("c1", "conv1", "bn1", ("conv2",)), ChannelGroup("c2", "conv2", "bn2", ("fc",))]


@CRITERIA.register("half_l1")
class HalfL1(Criterion):
    def _scores(self, model, granularity, sample):
        return [model.get_submodule(g.conv).weight.abs().flatten(1).sum(1) / 2 for g in model.channel_groups()]


@STAGES.register("note")
class Note(Stage):
    """Writes its text into note.txt and keeps the model."""

    options = (Str("text", "", "what to write"),)

    def run(self, model, ctx, checkpoint):
        (ctx.run.dir / "note.txt").write_text(ctx.cfg.schedule.note.text)
        ctx.run.rows.append(ctx.measure(self.name, model))
        ctx.run.save(self.name, [model], done=True)
        return model


def command(*overrides):
    """``prune-cli`` with the test's config folder on Hydra's search path and the registered parts chosen."""
    parts = ["model=twoconv", "criterion=half_l1", "schedule=noted"]
    return ["prune-cli", f"hydra.searchpath=[file://{EXTENSION_CONF}]", *parts, *TINY, *overrides]


def test_registered_parts_run_through_the_command(tmp_path, monkeypatch):
    argv = command("prune.ratio=0.5", "prune.target=channels", f"hydra.run.dir={tmp_path}")
    monkeypatch.setattr(sys, "argv", argv)
    main()
    results = pd.read_csv(tmp_path / "results.csv")
    assert list(results["stage"]) == ["init", "pretrain", "prune", "note"]
    assert (tmp_path / "note.txt").read_text() == "hello"
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert list(layers["after"]) == [4, 8]  # half of each group's channels, chosen by the new criterion
    assert results["model"].iloc[0] == "twoconv" and results["criterion"].iloc[0] == "half_l1"


def test_a_registered_stage_option_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", command("schedule.note.text=12", f"hydra.run.dir={tmp_path}"))
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
