"""The command as a user runs it: a sweep from the installed command in a process of its own; help and one-line
errors from its entry point in this process (the same exit codes and output); the sweep's aggregation."""

import os

import pandas as pd
import pytest

from helpers import run_cli as cli
from prune_cli.cli import report

TINY = [
    "dataset=synthetic",
    "dataset.train_size=64",
    "dataset.test_size=32",
    "dataset.image_size=8",
    "schedule.pretrain.epochs=1",
    "schedule.finetune.epochs=1",
    "trainer.progress=false",
    "trainer.threads=1",  # two test workers on two cores
    "latency=off",  # timing is tested in test_latency.py
]


def test_help_lists_groups_and_choices(command):
    r = command("--help")
    out = r.stdout
    assert r.returncode == 0
    for text in [
        "model: custom, resnet110, resnet18, resnet20",
        "vgg16",
        "dataset: cifar10, cifar100, digits",
        "schedule:",
        "criterion:",
        "regularizer:",
        "trainer: default",
        "debug: smoke",
    ]:
        assert text in out


def test_bad_value_is_one_line_and_nonzero(tmp_path, command):
    r = command(*TINY, "prune.ratio=1.5", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: prune.ratio: must be a number in (0, 1) or null; got 1.5"
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "results.csv").exists()


@pytest.mark.parametrize(
    "override, line",
    [
        ("prune.ratoi=0.5", "error: prune.ratoi: Could not override 'prune.ratoi'. To append to your config use +"),
        ("model=resnet57", "error: model: no choice 'resnet57' (available: custom, resnet110, "),
        ("prune.ratio=[", "error: prune.ratio=[: no viable alternative at input '['"),
        ("~nokey", "error: hydra: Could not delete from config. 'nokey' does not exist."),
    ],
)
def test_hydras_own_errors_are_one_line(tmp_path, monkeypatch, command, override, line):
    monkeypatch.chdir(tmp_path)
    r = command(override)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(line), r.stderr
    assert os.environ["HYDRA_FULL_ERROR"] == "0" and "_PRUNE_CLI_USER_HYDRA_FULL_ERROR" not in os.environ


def test_missing_data_names_where_it_looked(tmp_path, command):
    r = command("dataset=cifar10", f"dataset.root={tmp_path}/nodata", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset.root:") and str(tmp_path / "nodata") in last


@pytest.mark.slow
def test_sweep_aggregates_and_keeps_jobs_when_one_fails(tmp_path, capsys):
    r = cli("-m", *TINY, "prune.ratio=0.3,1.5,0.6", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert r.returncode == 1  # one job failed
    sweep = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert list(sweep["job"].astype(str)) == ["0", "1", "2"]
    assert list(sweep["status"]) == ["done", "failed", "done"]
    assert "prune.ratio" in sweep.loc[1, "error"]
    done = sweep[sweep["status"] == "done"]
    assert list(done["ratio"]) == [0.3, 0.6]
    assert (done["params_removed_%"].diff().dropna() > 0).all()  # a larger ratio removes more
    assert "failed" in (tmp_path / "sweep" / "sweep.md").read_text()

    # the same aggregation as the report command (its entry point, in this process), on any directory of runs
    (tmp_path / "sweep" / "sweep.csv").unlink()
    capsys.readouterr()
    assert report.main([str(tmp_path / "sweep"), "--output", str(tmp_path / "sweep")]) == 1  # a job failed
    assert "| job |" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "sweep" / "sweep.csv").equals(sweep)
