"""Measured latency: the timing function (one ordering check, the only timed assertion of the suite), the columns
of a run that prunes and its summary line, the same tables without them when off, the latency stage on a
checkpoint without data, and the option's place in resumption."""

import math

import pandas as pd
import pytest
import torch

from helpers import TINY, compose_config, results_table
from prune_cli.core import timing
from prune_cli.core.errors import UserError
from prune_cli.engine import latency
from prune_cli.models import build_model
from prune_cli.run import context, pipeline
from prune_cli.run.config import validate
from prune_cli.run.resumable import config_differences
from prune_cli.run.tables import timing_column

SMALL = [*TINY, "dataset.image_size=8", "model.width_mult=0.25", "trainer.eval_batch_size=16", "latency=on"]
COLUMNS = [*latency.COLUMNS]


def resnet20(width_mult):
    return build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3, "width_mult": width_mult})


@pytest.mark.slow
def test_a_model_with_many_times_the_macs_measures_slower():
    """The one timed check: 64x the MACs (8x the channels), medians of interleaved repeats. The wide model's forward
    (~20 ms alone at batch 32) is long against what a busy machine adds to the narrow one's (~2 ms alone)."""
    narrow, wide = resnet20(0.25).eval(), resnet20(2.0).train()
    state = torch.get_rng_state()
    (narrow_ms, narrow_iqr), (wide_ms, wide_iqr) = latency.time_models([narrow, wide], (3, 16, 16), 32, "cpu")
    assert wide_ms > narrow_ms > 0 and narrow_iqr < wide_ms  # (the spread's arithmetic: the test below)
    assert wide.training and not narrow.training  # each model's mode restored
    assert torch.equal(torch.get_rng_state(), state)  # inputs from a generator of their own


class Ticking(torch.nn.Module):
    """A model whose forwards take the given milliseconds on the test's clock, one after the other (and say so)."""

    def __init__(self, clock: dict, durations_ms):
        super().__init__()
        self.clock, self.durations = clock, iter(durations_ms)

    def forward(self, x):
        self.clock["now"] += next(self.durations) / 1000
        self.clock["calls"].append(self)
        return x


def test_time_models_reports_the_median_and_interquartile_range_of_interleaved_forwards(monkeypatch):
    """On a clock that only the forwards move: one warmup forward each (untimed), then five timed ones, interleaved;
    the median and the range between the first and third quartiles of each model's five times."""
    clock = {"now": 0.0, "calls": []}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    first = Ticking(clock, [1000, 5, 1, 4, 2, 3])  # the 1000 ms warmup forward is not timed
    second = Ticking(clock, [1000, 10, 90, 20, 40, 30])
    (first_ms, first_iqr), (second_ms, second_iqr) = latency.time_models(
        [first, second], (1,), 2, "cpu", warmup=1, repeats=5
    )
    assert (first_ms, first_iqr) == pytest.approx((3.0, 2.0))  # times 1..5: quartiles 2 and 4
    assert (second_ms, second_iqr) == pytest.approx((30.0, 20.0))  # 10, 20, 30, 40, 90: quartiles 20 and 40
    assert clock["calls"] == [first, second] * 6  # interleaved: a change of load falls on both alike


@pytest.mark.slow
def test_a_pruning_run_times_dense_and_pruned_and_equals_the_untimed_run(tmp_path):
    # no pretrain: the dense row is init, rebuilt from the config (its random state untouched: the tables agree)
    overrides = [*SMALL, "schedule.stages=[prune,finetune]", "schedule.finetune.epochs=1"]
    pipeline.run(compose_config(*overrides), tmp_path / "on")
    pipeline.run(compose_config(*overrides, "latency=off"), tmp_path / "off")
    on, off = (pd.read_csv(tmp_path / d / "results.csv").set_index("stage") for d in ("on", "off"))
    assert results_table(tmp_path / "on") == results_table(tmp_path / "off")
    assert not any(timing_column(c) for c in off.columns if c != "seconds")
    assert on[COLUMNS].loc[["init", "prune"]].notna().all().all() and on[COLUMNS].loc["finetune"].isna().all()
    prune, init = on.loc["prune"], on.loc["init"]
    assert prune["latency_batch"] == 16 and prune["latency_threads"] == torch.get_num_threads()
    for b in ("b1", "bN"):
        assert math.isclose(prune[f"speedup_{b}"], init[f"latency_ms_{b}"] / prune[f"latency_ms_{b}"])
    summary_on, summary_off = ((tmp_path / d / "summary.md").read_text() for d in ("on", "off"))
    assert "latency b1 " in summary_on and "| latency b16 (ms) |" in summary_on and "x), b16 " in summary_on
    assert "latency" not in summary_off


@pytest.mark.slow
def test_iterative_pruning_times_the_dense_row_model(tmp_path, monkeypatch):
    """With prune.steps=2 the stage removes channels from a model already pruned once: the dense one timed is
    the pretrain checkpoint's (the tables' dense row), the pruned one the stage's result."""
    timed = []
    real = latency.latency_columns

    def spy(models, *args):
        timed.append([m.widths for m in models])
        return real(models, *args)

    monkeypatch.setattr(latency, "latency_columns", spy)
    overrides = [*SMALL, "schedule.pretrain.epochs=1", "schedule.finetune.epochs=1", "prune.steps=2"]
    rows = pipeline.run(compose_config(*overrides, "prune.step_epochs=1"), tmp_path)
    layers = pd.read_csv(tmp_path / "layers.csv")
    dense = build_model(torch.load(tmp_path / "checkpoints" / "pretrain.pt", weights_only=True)["arch"]).widths
    assert timed == [[dense, list(layers["after"])]]
    assert all(not math.isnan(rows[1][c]) for c in COLUMNS) and "speedup_bN" in rows[2]


def test_the_latency_stage_times_a_checkpoint_without_reading_data(tmp_path, monkeypatch):
    pipeline.run(compose_config(*SMALL, "schedule=pretrain", "schedule.pretrain.epochs=1"), tmp_path / "a")
    monkeypatch.setattr(context, "load_data", lambda *a: pytest.fail("the latency stage read data"))
    ckpt = tmp_path / "a" / "checkpoints" / "pretrain.pt"
    rows = pipeline.run(compose_config(*SMALL, "schedule=latency", f"init_from={ckpt}"), tmp_path / "b")
    assert [r["stage"] for r in rows] == ["init", "pretrain", "latency"]
    assert rows[2]["top1"] == rows[1]["top1"] and rows[2]["params"] == rows[1]["params"]
    assert rows[2]["latency_ms_b1"] > 0 and rows[2]["latency_batch"] == 16 and "speedup_bN" not in rows[2]
    assert "latency b1 (ms)" in (tmp_path / "b" / "summary.md").read_text()


def test_the_option_off_under_smoke_refused_when_wrong_and_free_on_resumption():
    assert latency.enabled(compose_config()) and not latency.enabled(compose_config("debug=smoke"))
    assert not latency.enabled(compose_config("latency=off")) and latency.enabled({"latency": True})
    assert not latency.enabled({})  # a config written before the option: off, as those runs were
    with pytest.raises(UserError) as e:
        validate(compose_config("latency=maybe"))
    assert e.value.option == "latency"
    assert config_differences({"seed": 0}, {"seed": 0, "latency": "on"}) == []
    assert config_differences({"latency": "off"}, {"latency": "on"}) == []
    assert [c for c in ("seconds", "pretrain_seconds", "latency_ms_b1", "speedup_bN", "top1") if timing_column(c)] == [
        "seconds",
        "pretrain_seconds",
        "latency_ms_b1",
        "speedup_bN",
    ]
