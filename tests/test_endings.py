"""Every way a run ends leaves a true status.json, the finished stages intact, and a directory that resumes:
a crash mid-stage (failed, exit 1) and SIGTERM (interrupted, exit 143)."""

import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from helpers import TINY, compose_config, results_table
from prune_cli.cli.run import main
from prune_cli.engine import loop
from prune_cli.run import pipeline

RUN = [*TINY, "schedule.pretrain.epochs=2", "schedule.finetune.epochs=2"]


def status(run_dir):
    return json.loads((run_dir / "status.json").read_text())


@pytest.mark.slow
def test_a_crash_mid_stage_is_failed_and_the_rerun_resumes(tmp_path, monkeypatch):
    real_epoch = loop.train_epoch
    calls = {"n": 0}

    def crashing_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the first finetune epoch
            raise RuntimeError("injected fault")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", crashing_epoch)
    monkeypatch.setattr(sys, "argv", ["prune-cli", *RUN, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    assert status(tmp_path) == {"status": "failed", "error": "RuntimeError: injected fault"}
    assert "injected fault" in (tmp_path / "traceback.txt").read_text()
    pretrain = torch.load(tmp_path / "checkpoints" / "pretrain.pt", weights_only=True)
    prune = tmp_path / "checkpoints" / "prune.pt"
    assert pretrain["done"] and prune.is_file()
    before = prune.read_bytes()
    assert list(pd.read_csv(tmp_path / "results.csv")["stage"]) == ["init", "pretrain", "prune"]

    monkeypatch.setattr(loop, "train_epoch", real_epoch)
    main()  # the same command resumes: pretrain and prune are taken, finetune runs
    assert status(tmp_path)["status"] == "done"
    assert prune.read_bytes() == before
    assert list(pd.read_csv(tmp_path / "results.csv")["stage"]) == ["init", "pretrain", "prune", "finetune"]


@pytest.mark.slow
def test_sigterm_leaves_interrupted_and_the_rerun_resumes(tmp_path, command):
    """SIGTERM mid-pretrain: interrupted, exit 143; the rerun gives the uninterrupted run's table."""
    overrides = [*RUN, "schedule.pretrain.epochs=15", "trainer.threads=1"]
    pipeline.run(compose_config(*overrides), tmp_path / "uninterrupted")
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "prune_cli", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = run_dir / "checkpoints" / "pretrain.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("interrupted: ")
    assert status(run_dir)["status"] == "interrupted"
    done_epochs = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= done_epochs < 15
    rerun = command(*args[3:])  # the same command again; only the signal needed a process of its own
    assert rerun.returncode == 0, rerun.stderr
    assert status(run_dir)["status"] == "done"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics[metrics["stage"] == "pretrain"]["epoch"]) == list(range(1, 16))  # no epoch twice
    assert results_table(run_dir) == results_table(tmp_path / "uninterrupted")


def test_ctrl_c_is_interrupted_with_exit_130(tmp_path, monkeypatch):
    def interrupted_epoch(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_epoch", interrupted_epoch)
    monkeypatch.setattr(sys, "argv", ["prune-cli", *RUN, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 130
    assert status(tmp_path) == {"status": "interrupted", "error": "SIGINT"}
