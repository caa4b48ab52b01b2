"""Data-parallel training under torchrun (2 CPU processes, gloo): one epoch equals a single process training on
the same global batches, a whole run (a sweep of two) writes its tables once, into rank 0's directories, and a
launcher with worker processes of its own is refused."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import results_table

HERE = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(args, cwd, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.slow  # torchrun starts three processes a launch
def test_two_processes_train_as_one(tmp_path):
    """No BatchNorm (whose batch statistics would differ per shard): the weights after one epoch, 6 steps of 32
    images and one of 8, match the single-process run to 1e-5, and so do the epoch's loss and accuracy; so do a
    network's distilled from a teacher each rank runs on its own shard."""
    import ddp_fit

    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    threads = torch.get_num_threads()
    try:
        ddp_fit.main(str(one))  # the single process: this one (not launched: the distributed layer is the identity)
    finally:
        torch.set_num_threads(threads)
    r = launch([*TORCHRUN, str(HERE / "ddp_fit.py"), str(two)], tmp_path)
    assert r.returncode == 0, r.stderr
    for a, b in [(torch.load(one), torch.load(two)), (torch.load(one)["distilled"], torch.load(two)["distilled"])]:
        for key, value in a["state"].items():
            torch.testing.assert_close(b["state"][key], value, atol=1e-5, rtol=0)
        for metric in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert abs(a["history"][0][metric] - b["history"][0][metric]) < 1e-5, metric


@pytest.mark.slow
def test_torchrun_sweep_writes_once(tmp_path):
    """A BatchNorm ResNet through pretrain, prune and finetune, two seeds: rank 0's sweep directory holds both jobs'
    tables and the sweep table; the other rank leaves nothing behind; the summary is printed once per job; a
    lost stage is trained again to the same table."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    sweep = tmp_path / "sweep"
    args = ["-m", "prune_cli", "-m", "seed=0,1", "debug=smoke", "latency=off", "trainer.progress=false"]
    args += ["model.width_mult=0.25", "trainer.threads=1"]  # two ranks on two cores
    # 64 + 32 synthetic 8x8 images made in memory: no dataset module to import and read in every rank
    args += ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32", "dataset.image_size=8"]
    args += ["dataset.subset=null", "dataset.test_subset=null"]
    r = launch([*TORCHRUN, *args, f"hydra.sweep.dir={sweep}"], tmp_path, env={"TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr
    for job in ("0", "1"):
        rows = list(csv.DictReader(open(sweep / job / "results.csv")))
        assert [row["stage"] for row in rows] == ["init", "pretrain", "prune", "finetune"]
        assert (sweep / job / "status.json").read_text().count('"done"') == 1
    assert (sweep / "sweep.csv").is_file()
    assert r.stdout.count("dense -> pruned") == 2  # each job's summary once: rank 1 prints nothing
    assert not list(scratch.glob("prune_cli_rank*"))  # rank 1's scratch output directories are gone

    # resuming: job 0 lost its finetune stage; the same command trains it again from the prune checkpoint, which
    # both ranks read from rank 0's directory, and gives the same table; job 1 is taken from its checkpoints
    tables = [results_table(sweep / job) for job in ("0", "1")]
    (sweep / "0" / "checkpoints" / "finetune.pt").unlink()
    r = launch([*TORCHRUN, *args, f"hydra.sweep.dir={sweep}"], tmp_path, env={"TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr
    assert [results_table(sweep / job) for job in ("0", "1")] == tables


def test_a_launcher_with_its_own_workers_is_refused_under_torchrun(command, monkeypatch, tmp_path):
    """As rank 0 of two sees it (torchrun's environment): refused before joining the group or starting Hydra."""
    monkeypatch.chdir(tmp_path)
    r = command("-m", "seed=0,1", "hydra/launcher=joblib", env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: hydra/launcher: joblib starts its own worker processes; under torchrun sweep with the basic one"
    ]
