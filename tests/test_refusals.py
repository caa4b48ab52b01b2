"""Honest tables or a clear error: each mistake a researcher makes, or fault a run meets, ends in one line
naming the option, the right exit code, and (where a record exists) that record left byte-identical."""

import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import SCHEMA1_OVERRIDES, SCHEMA1_RUN, TINY, compose_config
from prune_cli.cli import report
from prune_cli.cli.run import main
from prune_cli.core.errors import UserError
from prune_cli.run import lock, pipeline

NO_DATA = ["dataset=cifar10", "dataset.root=/nonexistent/prune_cli_data"]  # reading it would fail otherwise


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def command(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``prune-cli ARGS`` in this process: (exit code, the last line on stderr)."""
    monkeypatch.setattr(sys, "argv", ["prune-cli", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


@pytest.mark.parametrize(
    "overrides,option,why",
    [
        (["prune.skip=[layers.7.*]"], "prune.skip", "'layers.7.*' matches no layer of resnet20"),
        (["+prune.layer_ratios.conv9=0.5"], "prune.layer_ratios", "'conv9' matches no layer of resnet20"),
        (["prune.skip=layers.0.0"], "prune.skip", "must be a list (each a string) (write it in brackets"),
        (["prune.min_channels=20"], "prune.min_channels", "20 is above the width of layers.0.0 (16 channels)"),
        (  # 336 channels, 18 of them kept: at most 94.6% can go
            ["prune.target=channels", "prune.ratio=0.95", "prune.min_channels=2"],
            "prune.ratio",
            "0.95 of the channels cannot be removed: with prune.min_channels, skip and protect_last as set at most "
            "0.9464 can go",
        ),
        (["prune.skip=[layers.*]"], "prune.ratio", "0.5 of the params cannot be removed"),
        (["prune.ratio=null"], "prune.ratio", "criterion l1 has no threshold of its own"),
        (["criterion=bn_scale", "criterion.rule=polarization"], "prune.ratio", "sets its own threshold"),
        (["+unknown=1"], "unknown", "unknown option"),
        (["+criterion.granularty=filter"], "criterion.granularty", "unknown option"),
        (["schedule.pretrain.momentum=high"], "schedule.pretrain.momentum", "must be a number in [0, 1)"),
        (["schedule.pretrain.milestones=[0.5, x]"], "schedule.pretrain.milestones[1]", "must be a number in (0, 1]"),
    ],
)
def test_settings_that_cannot_work_fail_before_data_is_read(tmp_path, overrides, option, why):
    with pytest.raises(UserError) as e:
        pipeline.run(compose_config(*NO_DATA, *overrides), tmp_path)
    assert e.value.option == option and why in e.value.why, str(e.value)
    assert not (tmp_path / "checkpoints").exists()


def test_a_diverging_stage_stops_with_its_learning_rate(tmp_path, monkeypatch, capsys):
    code, line = command(monkeypatch, capsys, *TINY, "schedule.pretrain.lr=1e6", f"hydra.run.dir={tmp_path}")
    assert code == 2
    assert line.startswith("error: schedule.pretrain.lr: the ") and "in epoch 1 of pretrain at lr 1e+06;" in line
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"
    assert not (tmp_path / "checkpoints").exists()  # the diverged epoch is not checkpointed, nothing was pruned


@pytest.mark.slow
def test_a_directory_holding_another_run_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    run = [*TINY, "schedule.pretrain.epochs=1", "schedule.finetune.epochs=1", f"hydra.run.dir={tmp_path}"]
    assert command(monkeypatch, capsys, *run)[0] == 0
    before = snapshot(tmp_path)
    assert {".hydra/config.yaml", "__main__.log", "status.json", "results.csv", "checkpoints/prune.pt"} <= set(before)
    code, line = command(monkeypatch, capsys, *run, "prune.ratio=0.7")
    assert code == 2
    assert line.startswith(f"error: hydra.run.dir: {tmp_path} holds a run with a different config (prune.ratio)")
    assert snapshot(tmp_path) == before


def hold_lock(run_dir: Path, release) -> None:
    """A run of another process: it owns ``run_dir`` until ``release`` is set, then ends (its lock file stays)."""
    lock.acquire(run_dir)
    release.wait()


@pytest.mark.slow
def test_a_directory_in_use_is_refused_and_a_dead_runs_lock_is_not(tmp_path, monkeypatch, capsys):
    tmp_path.mkdir(exist_ok=True)
    # another process owning the directory through prune_cli's own lock: forked from this one, so it needs no new
    # interpreter importing torch only to take a lock
    forked = multiprocessing.get_context("fork")
    release = forked.Event()
    holder = forked.Process(target=hold_lock, args=(tmp_path, release))
    holder.start()
    try:
        deadline = time.monotonic() + 60
        while not ((tmp_path / "run.lock").is_file() and (tmp_path / "run.lock").read_text()):
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.02)
        before = snapshot(tmp_path)
        code, line = command(monkeypatch, capsys, *TINY, f"hydra.run.dir={tmp_path}")
        assert code == 2
        assert line.startswith(f"error: hydra.run.dir: {tmp_path} is in use by another run (")
        assert f"pid {holder.pid}" in line
        assert snapshot(tmp_path) == before
    finally:
        release.set()
        holder.join(timeout=30)
    # the holder is gone: its lock file remains, but no process holds it, so the next run goes ahead
    code, _ = command(
        monkeypatch,
        capsys,
        *TINY,
        "schedule.pretrain.epochs=1",
        "schedule.finetune.epochs=1",
        f"hydra.run.dir={tmp_path}",
    )
    assert code == 0


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    code, line = command(monkeypatch, capsys, *TINY, f"hydra.run.dir={tmp_path / 'a_file' / 'run'}")
    assert code == 2
    assert line == f"error: hydra.run.dir: cannot write {tmp_path / 'a_file' / 'run'} (Not a directory)"


@pytest.mark.parametrize(
    "overrides,why",
    [
        (["model=resnet32"], "holds the model resnet20; this run has resnet32"),
        (["dataset.num_classes=5"], "holds classes 10; this run has 5"),
        (["dataset.image_size=16"], "holds images of 8x8; this run has 16x16"),
        (["dataset=digits"], "holds input channels 3; this run has 1"),
    ],
)
def test_init_from_another_model_or_data_is_refused(tmp_path, overrides, why):
    init = f"init_from={SCHEMA1_RUN / 'checkpoints' / 'pretrain.pt'}"
    other_data = overrides[0].startswith("dataset=")  # then the synthetic data's own settings do not apply
    base = [o for o in SCHEMA1_OVERRIDES if not (other_data and o.startswith("dataset."))]
    with pytest.raises(UserError) as e:
        pipeline.run(compose_config(*base, *overrides, init), tmp_path)
    assert e.value.option == "init_from" and why in e.value.why, str(e.value)


def test_init_from_an_unfinished_checkpoint_is_refused(tmp_path):
    ck = torch.load(SCHEMA1_RUN / "checkpoints" / "pretrain.pt", weights_only=True)
    torch.save({**ck, "done": False, "epoch": 3}, tmp_path / "half.pt")
    with pytest.raises(UserError) as e:
        pipeline.run(compose_config(*SCHEMA1_OVERRIDES, f"init_from={tmp_path / 'half.pt'}"), tmp_path / "run")
    assert e.value.option == "init_from"
    assert "is unfinished (its pretrain stage stopped after epoch 3)" in e.value.why


def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(SCHEMA1_RUN / "checkpoints", run / "checkpoints")
    damaged = run / "checkpoints" / "prune.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(UserError) as e:
        pipeline.run(compose_config(*SCHEMA1_OVERRIDES), run)
    assert e.value.option == "hydra.run.dir"
    assert (
        e.value.why.startswith(f"{damaged} cannot be read (")
        and "delete it to recompute the prune stage" in e.value.why
    )
    assert damaged.read_bytes() == (SCHEMA1_RUN / "checkpoints" / "prune.pt").read_bytes()[:1000]


def test_the_report_lists_unreadable_runs_and_exits_non_zero(tmp_path, capsys):
    pipeline.run(compose_config(*TINY, "schedule=measure"), tmp_path / "good")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "results.csv").write_text("")
    assert report.main([str(tmp_path), "--output", str(tmp_path)]) == 1  # the tables only where it is told
    sweep = pd.read_csv(tmp_path / "sweep.csv")
    assert dict(zip(sweep["job"], sweep["status"])) == {"empty": "unreadable", "good": "done"}
    assert "results.csv is empty" in (tmp_path / "sweep.md").read_text()


def test_every_run_records_what_produced_it(tmp_path, capsys):
    pipeline.run(compose_config(*TINY, "schedule.pretrain.epochs=1", "schedule.finetune.epochs=1"), tmp_path / "r")
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["torch"] == str(torch.__version__) and run["device"] == "cpu" and run["threads"] == 1
    assert {"prune_cli", "git_commit", "torchvision", "python", "precision", "deterministic"} <= set(run)
    ck = torch.load(tmp_path / "r" / "checkpoints" / "finetune.pt", weights_only=True)
    assert ck["provenance"] == run
    report.main([str(tmp_path)])
    assert "| torch |" in capsys.readouterr().out.replace(" device |", "").replace("| prune_cli ", "")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        pipeline.run(compose_config(*TINY, "schedule=measure"), tmp_path)
    finally:
        os.umask(old)
    for name in ("results.csv", "status.json", "summary.md", "run.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
