"""Aggregation over runs: groups by every setting but the seed, statistics checked against hand computations,
failed jobs counted and listed, the dense-model check, pivots and formats, plots, and one small CLI sweep."""

import io
import json
import shutil
import sys

import pandas as pd
import pytest
import torch
import yaml

from helpers import TINY, run_cli
from prune_cli.cli import report

IDENT = {"model": "resnet20", "dataset": "synthetic", "regularizer": "none", "target": "params"}


def config(seed, criterion="l1", ratio=0.5, init_from=None, **settings):
    """A run's config (what .hydra/config.yaml or a checkpoint holds); ``settings``: dotted keys with '__' for '.'."""
    cfg = {
        "seed": seed,
        "init_from": init_from,
        "trainer": {"device": "auto", "threads": 0, "batch_size": 32},
        "model": {"name": "resnet20", "width_mult": 1.0},
        "dataset": {"name": "synthetic", "root": "data"},
        "regularizer": {"name": "none"},
        "criterion": {"name": criterion},
        "prune": {"target": "params", "ratio": ratio, "scope": "layer"},
        "schedule": {"stages": ["pretrain", "prune", "finetune"], "finetune": {"lr": 0.01, "epochs": 1}},
    }
    for dotted, value in settings.items():
        *path, last = dotted.split("__")
        block = cfg
        for part in path:
            block = block[part]
        block[last] = value
    return cfg


def make_run(
    d,
    cfg,
    top1=None,
    dense=70.0,
    macs_after=4000,
    status="done",
    error="",
    hydra=True,
    overrides=(),
):
    """A run directory as prune-cli writes it: results.csv (init, pretrain = the dense row, prune, finetune),
    status.json, and its config in .hydra/ (hydra=True) or in a checkpoint (hydra=False)."""
    d.mkdir(parents=True)
    ident = {**IDENT, "criterion": cfg["criterion"]["name"], "ratio": cfg["prune"]["ratio"], "seed": cfg["seed"]}
    if top1 is not None:
        rows = [
            {"stage": "init", "top1": 10.0, "best_top1": None, "params": 1000, "macs": 10000},
            {"stage": "pretrain", "top1": dense, "best_top1": dense, "params": 1000, "macs": 10000},
            {"stage": "prune", "top1": 20.0, "best_top1": 20.0, "params": 500, "macs": macs_after},
            {"stage": "finetune", "top1": top1, "best_top1": top1, "params": 500, "macs": macs_after},
        ]
        extra = {"loss": 1.0, "epochs": 1, "seconds": 0.1}
        pd.DataFrame([{**r, **extra, **ident} for r in rows]).to_csv(d / "results.csv", index=False)
    (d / "status.json").write_text(json.dumps({"status": status, "error": error}))
    if hydra:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    else:
        (d / "checkpoints").mkdir()
        torch.save({"config": cfg, "stage": "finetune"}, d / "checkpoints" / "finetune.pt")


def by_hand(values):
    """Mean and sample standard deviation, written out."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def test_seeds_are_averaged_with_the_statistics_computed_by_hand(tmp_path, capsys):
    finals, denses, macs = [61.0, 63.5, 66.0], [70.0, 71.0, 72.5], [4000, 4200, 4400]
    for seed in range(3):  # seed 1 ran with other threads and another device: the same experiment
        cfg = config(seed, trainer__threads=2 if seed == 1 else 0, trainer__device="cpu" if seed == 1 else "auto")
        make_run(tmp_path / f"l1_s{seed}", cfg, finals[seed], denses[seed], macs[seed], overrides=[f"seed={seed}"])
    make_run(tmp_path / "l1_s3", config(3), status="failed", error="prune.ratio: boom")
    make_run(tmp_path / "random_s0", config(0, "random"), 55.0, 70.0)

    assert report.main([str(tmp_path), "--output", str(tmp_path)]) == 1  # a job failed
    out = capsys.readouterr().out
    summary = pd.read_csv(tmp_path / "sweep_summary.csv", keep_default_na=False, na_values=[""])
    assert list(summary["criterion"]) == ["l1", "random"]
    l1 = summary.iloc[0]
    mean, std = by_hand(finals)
    dense_mean, dense_std = by_hand(denses)
    change_mean, change_std = by_hand([f - d for f, d in zip(finals, denses)])
    assert (l1["n"], l1["not_done"], l1["not_done_jobs"], l1["jobs"]) == (3, 1, "l1_s3", "l1_s0 l1_s1 l1_s2")
    assert l1["top1_mean"] == pytest.approx(mean) and l1["top1_std"] == pytest.approx(std)
    assert l1["dense_top1_mean"] == pytest.approx(dense_mean) and l1["dense_top1_std"] == pytest.approx(dense_std)
    assert l1["top1_change_mean"] == pytest.approx(change_mean)
    assert l1["top1_change_std"] == pytest.approx(change_std)
    assert (l1["top1_min"], l1["top1_max"]) == (61.0, 66.0)
    assert (l1["best_of_n_top1"], l1["best_of_n_seed"], l1["best_of_n_job"]) == (66.0, 2, "l1_s2")
    assert l1["params_removed_%_mean"] == pytest.approx(50.0)
    assert l1["macs_removed_%_mean"] == pytest.approx((60 + 58 + 56) / 3)
    assert l1["dense_check"] == "ok"  # each seed trained its own dense model
    random = summary.iloc[1]
    assert random["n"] == 1 and random["top1_mean"] == 55.0 and pd.isna(random["top1_std"])

    # the printed table: the jobs, then one row per group with mean ± std ("-" for n = 1), failures listed
    assert "| job |" in out
    assert f"| 3 | {dense_mean:.2f} ± {dense_std:.2f} | {mean:.2f} ± {std:.2f} | {change_mean:+.2f} ± " in out
    assert "| 1 | 70.00 ± - | 55.00 ± - | -15.00 ± - |" in out
    assert "| best of n (seed) |" in out and "| 66.00 (seed 2) |" in out
    assert "not done (1 of 5 jobs): l1_s3 (failed): prune.ratio: boom" in out
    assert out.endswith((tmp_path / "sweep_summary.md").read_text())


def test_a_sweep_over_a_non_seed_setting_is_not_averaged(tmp_path, capsys):
    # the identity columns are equal for all six runs: only prune.scope or the finetuning lr tells them apart.
    # No .hydra/: the settings come from the checkpoints (runs written by pipeline.run)
    runs = {
        ("layer", 0.01): [60.0, 62.0],
        ("global", 0.01): [70.0, 75.0],
        ("layer", 0.1): [50.0, 51.0],
    }
    for (scope, lr), finals in runs.items():
        for seed, top1 in enumerate(finals):
            cfg = config(seed, prune__scope=scope, schedule__finetune__lr=lr)
            make_run(tmp_path / f"{scope}_{lr}_{seed}", cfg, top1, hydra=False)
    assert report.main([str(tmp_path), "--format", "csv", "--output", str(tmp_path)]) == 0
    summary = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert len(summary) == 3 and list(summary["n"]) == [2, 2, 2]
    for (scope, lr), finals in runs.items():
        row = summary[(summary["prune.scope"] == scope) & (summary["schedule.finetune.lr"] == lr)].iloc[0]
        assert (row["top1_mean"], row["top1_std"]) == pytest.approx(by_hand(finals))
    printed = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert printed.equals(summary)

    # a pivot: scope by lr, the cell of a combination that did not run is empty
    assert (
        report.main([str(tmp_path), "--by", "prune.scope", "--columns", "schedule.finetune.lr", "--format", "json"])
        == 0
    )
    table = json.loads(capsys.readouterr().out)
    rows = {r["prune.scope"]: r for r in table["rows"]}
    assert rows["layer"]["schedule.finetune.lr=0.01 mean"] == pytest.approx(61.0)
    assert rows["layer"]["schedule.finetune.lr=0.1 n"] == 2
    assert rows["global"]["schedule.finetune.lr=0.1 mean"] is None and rows["global"]["schedule.finetune.lr=0.1 n"] == 0
    assert report.main([str(tmp_path), "--by", "prune.scope", "--columns", "schedule.finetune.lr"]) == 0
    md = capsys.readouterr().out
    assert "| prune.scope | schedule.finetune.lr=0.01 | schedule.finetune.lr=0.1 |" in md
    assert f"| global | 72.50 ± {by_hand([70.0, 75.0])[1]:.2f} (2) | - |" in md
    assert report.main([str(tmp_path), "--columns", "prune.scope", "--value", "top1_change", "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert "\\begin{tabular}" in latex and "prune.scope=global" in latex and "$\\pm$" in latex


def test_a_run_older_than_an_option_groups_at_the_value_it_ran_with(tmp_path):
    """An old config lacks options declared since (their ``absent``: what those runs ran as): it joins the runs
    that set them to that value, not the ones that set them otherwise."""
    make_run(tmp_path / "old", config(0), 60.0)  # before prune.step_grid and the logger block existed
    new = config(1, prune__step_grid="linear", prune__residual=False)
    new["logger"] = {"name": "none"}
    make_run(tmp_path / "new", new, 62.0)
    make_run(tmp_path / "geometric", config(2, prune__step_grid="geometric"), 50.0)
    assert report.main([str(tmp_path), "--format", "csv", "--output", str(tmp_path)]) == 0
    summary = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert sorted(zip(summary["prune.step_grid"], summary["n"], summary["jobs"])) == [
        ("geometric", 1, "geometric"),
        ("linear", 2, "new old"),
    ]


def test_runs_with_and_without_distillation_are_kept_apart(tmp_path):
    """Finetunes distilled from the dense model form their own group; runs with alpha 0 (off) group with runs
    written before the distill block existed."""
    finetune = {"lr": 0.01, "epochs": 1}
    kd = {"alpha": 0.9, "temperature": 4.0, "teacher": "dense"}
    for seed in (0, 1):
        make_run(tmp_path / f"old{seed}", config(seed), 60.0 + seed)
        off = {**finetune, "distill": {**kd, "alpha": 0.0}}
        make_run(tmp_path / f"off{seed}", config(seed + 2, schedule__finetune=off), 62.0 + seed)
        make_run(tmp_path / f"kd{seed}", config(seed, schedule__finetune={**finetune, "distill": kd}), 70.0 + seed)
    assert report.main([str(tmp_path), "--format", "csv", "--output", str(tmp_path)]) == 0
    summary = pd.read_csv(tmp_path / "sweep_summary.csv")
    groups = sorted(zip(summary["schedule.finetune.distill.alpha"], summary["n"], summary["top1_mean"]))
    assert groups == [(0.0, 4, pytest.approx(61.5)), (0.9, 2, pytest.approx(70.5))]


def test_runs_of_one_group_from_different_dense_models_are_flagged(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "a.pt").write_bytes(b"dense model A")
    (ckpts / "a_copy.pt").write_bytes(b"dense model A")
    (ckpts / "b.pt").write_bytes(b"dense model B")
    runs = tmp_path / "runs"
    a, a_copy, b = (str(ckpts / n) for n in ("a.pt", "a_copy.pt", "b.pt"))
    # l1: two runs from A, one from B -> flagged
    make_run(runs / "l1_0", config(0, init_from=a), 60.0, 80.0)
    make_run(runs / "l1_1", config(1, init_from=a), 61.0, 80.0)
    make_run(runs / "l1_2", config(2, init_from=b), 62.0, 81.0)
    # random: from two copies of one checkpoint (same content) -> ok
    make_run(runs / "random_0", config(0, "random", init_from=a), 60.0, 80.0)
    make_run(runs / "random_1", config(1, "random", init_from=a_copy), 61.0, 80.0)
    # l2: each seed trains its own dense model -> different dense rows are expected, ok
    make_run(runs / "l2_0", config(0, "l2"), 60.0, 70.0)
    make_run(runs / "l2_1", config(1, "l2"), 61.0, 75.0)
    # fpgm: two runs of seed 0 whose dense rows differ -> flagged
    make_run(runs / "fpgm_0", config(0, "fpgm"), 60.0, 70.0)
    make_run(runs / "fpgm_0_again", config(0, "fpgm"), 61.0, 71.0)
    assert report.main([str(runs), "--output", str(runs)]) == 0
    summary = pd.read_csv(runs / "sweep_summary.csv")
    assert dict(zip(summary["criterion"], summary["dense_check"])) == {
        "l1": "differ",
        "random": "ok",
        "l2": "ok",
        "fpgm": "differ",
    }
    text = (runs / "sweep_summary.md").read_text()
    assert f"criterion=l1: started from different dense models ({a} (sha256 " in text
    assert f"{b} (sha256 " in text and "job l1_2" in text
    assert (
        "criterion=fpgm: seed 0 but different dense rows (dense top-1: job fpgm_0 70.00, job fpgm_0_again 71.00)"
        in text
    )


def test_report_failures_are_one_line(tmp_path, capsys, monkeypatch):
    make_run(tmp_path / "r0", config(0), 60.0)
    for args, what in [
        (["--by", "seed"], "error: --by: seed is what a group averages over"),
        (["--columns", "prune.scop"], "error: --columns: no setting prune.scop groups these runs"),
        (["--by", "criterion", "--columns", "criterion"], "error: --columns: criterion is already a row key"),
    ]:
        assert report.main([str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(what) and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path), "--format", "html"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --format: invalid choice: 'html'")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert report.main([str(tmp_path), "--plots"]) == 2
    assert capsys.readouterr().err == "error: --plots: matplotlib is not installed (pip install 'prune-cli[plots]')\n"


@pytest.mark.slow
def test_a_cli_sweep_prints_one_table_per_criterion_and_plots(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    # smoke size (one epoch per stage, no timing) on all of TINY's images at 8x8, at a quarter of ResNet-20's
    # width, one thread (the suite's two workers share two cores)
    small = [*TINY, "debug=smoke", "dataset.subset=null", "dataset.test_subset=null", "model.width_mult=0.25"]
    small += ["dataset.image_size=8", "trainer.threads=1"]
    r = run_cli("-m", *small, "criterion=l1,random", "seed=0,1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = pd.read_csv(sweep / "sweep.csv")
    summary = pd.read_csv(sweep / "sweep_summary.csv")
    assert list(summary["criterion"]) == ["l1", "random"] and list(summary["n"]) == [3, 3]
    for _, row in summary.iterrows():
        mean, std = by_hand(list(jobs[jobs["criterion"] == row["criterion"]]["top1"]))
        assert (row["top1_mean"], row["top1_std"]) == pytest.approx((mean, std))
        assert f"| {row['criterion']} | params | 0.5 | 3 | " in r.stdout and f"{mean:.2f} ± {std:.2f}" in r.stdout
    assert r.stdout.count("| model | dataset | regularizer | criterion | target | ratio | n |") == 1
    for name in ("top1_vs_macs", "top1_vs_params"):
        assert (sweep / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert "MACs removed (%): conv + linear multiply-accumulates, one image" in (sweep / "top1_vs_macs.svg").read_text()

    # on demand, for one run: its channel widths and training curves
    run = tmp_path / "run"
    shutil.copytree(sweep / "0", run)
    assert report.main([str(run), "--plots", "--output", str(run)]) == 0
    assert "plots: wrote 8 files" in capsys.readouterr().err
    for name in ("widths", "curves"):
        assert (run / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert "before pruning" in (run / "widths.svg").read_text()
    assert "learning rate" in (run / "curves.svg").read_text()
