"""Hyperparameter search through Hydra's Optuna sweeper: the objective a run returns (``objective``), checked
against hand-computed values, and a 3-trial TPE study on the digits smoke configuration whose best trial's
objective is the one its own results table gives."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from helpers import compose_config, run_cli
from prune_cli.core.errors import UserError
from prune_cli.run import objective
from prune_cli.run.config import validate

ROWS = [
    {"stage": "init", "top1": 10.0, "params": 1000, "macs": 10000},
    {"stage": "pretrain", "top1": 90.0, "best_top1": 90.0, "params": 1000, "macs": 10000},
    {"stage": "prune", "top1": 60.0, "best_top1": 60.0, "params": 450, "macs": 6000, "speedup_b1": 1.6},
    {"stage": "finetune", "top1": 85.0, "best_top1": 86.5, "params": 450, "macs": 6000},
]


def goal(**settings):
    return OmegaConf.create({**objective.OPTION.absent, **settings})


def test_the_objective_is_the_hand_computed_one():
    assert objective.value(ROWS, goal()) == 85.0
    assert objective.value(ROWS, goal(metric="best_top1")) == 86.5
    assert objective.value(ROWS, goal(metric="top1_change")) == -5.0
    # 40% of the MACs removed, 50% asked: 10 points short at 10 points each
    assert objective.value(ROWS, goal(budget=0.5)) == pytest.approx(85.0 - 100.0)
    assert objective.value(ROWS, goal(budget=0.5, budget_of="params")) == 85.0  # 55% removed: met
    # 1.6x faster at batch 1: 37.5% of the latency removed, 40% asked: 2.5 points short at 2 points each
    assert objective.value(ROWS, goal(budget=0.4, budget_of="latency", penalty=2.0)) == pytest.approx(80.0)
    assert math.isnan(objective.value(ROWS[:2], goal(metric="top1_change")))  # nothing pruned: no comparison


def test_what_the_objective_compares_must_exist():
    for overrides, option in [
        (["objective.budget=0.5", "objective.budget_of=latency"], "objective.budget_of"),  # latency=off (smoke)
        (["objective.metric=top1_change", "schedule=pretrain"], "objective.metric"),  # nothing prunes
        (["objective.budget=0.5", "schedule=pretrain"], "objective.budget"),
    ]:
        with pytest.raises(UserError) as e:
            validate(compose_config("debug=smoke", *overrides))
        assert e.value.option == option


@pytest.mark.slow
def test_an_optuna_study_maximises_the_objective_its_tables_give(tmp_path):
    """TPE over the finetune lr and the pruned share of params, 3 trials, with a budget of half the MACs: the
    study's best value is the highest objective computed from the trials' own results tables."""
    sweep = tmp_path / "sweep"
    r = run_cli(
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.direction=maximize",
        "schedule.finetune.lr=tag(log, interval(0.001, 0.3))",
        "prune.ratio=interval(0.3, 0.7)",
        "objective.budget=0.5",
        "debug=smoke",
        "latency=off",
        "trainer.progress=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    study = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = {}
    for job in ("0", "1", "2"):
        rows = pd.read_csv(sweep / job / "results.csv")
        dense, final = rows[rows.stage == "pretrain"].iloc[0], rows.iloc[-1]
        short = max(0.0, 0.5 - (1 - final.macs / dense.macs))
        values[job] = final.top1 - 10.0 * 100 * short
    assert study["best_value"] == pytest.approx(max(values.values()), abs=1e-9)
    best = max(values, key=values.get)
    overrides = yaml.safe_load((sweep / best / ".hydra" / "overrides.yaml").read_text())
    assert f"prune.ratio={study['best_params']['prune.ratio']}" in overrides
