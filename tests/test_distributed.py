"""Data-parallel training under torchrun (2 CPU processes, gloo): one epoch equals a single process training on
the same global batches (plainly, distilled, and from a streamed image folder each rank decodes its shard of), a
whole run (a sweep of two) writes its tables once, into rank 0's directories, and a launcher with worker processes
of its own is refused."""

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
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


def launch(args, cwd, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.slow  # torchrun starts three processes a launch: one launch for the checks below
def test_two_processes_train_as_one_and_decode_their_shards(tmp_path):
    """No BatchNorm (whose batch statistics would differ per shard): the weights after one epoch, 6 steps of 32
    images and one of 8, match the single-process run to 1e-5, and so do the epoch's loss and accuracy; so do a
    network's distilled from a teacher each rank runs on its own shard. A streamed image folder: each rank decodes
    only its shard of every training batch and its own evaluation batches, and the table is the in-memory one."""
    import ddp_fit
    import ddp_stream
    from test_imagefolder import make_folder

    root = tmp_path / "images"
    make_folder(root)
    (root / "train" / "eel" / "3.png").unlink()  # 11 train images: a last batch of one, which both ranks use whole
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    threads = torch.get_num_threads()
    try:
        ddp_fit.main(str(one), str(root))  # the single process: this one (the distributed layer is the identity)
    finally:
        torch.set_num_threads(threads)
    r = launch([*TORCHRUN, str(HERE / "ddp_fit.py"), str(two), str(root)], tmp_path)
    assert r.returncode == 0, r.stderr
    for a, b in [(torch.load(one), torch.load(two)), (torch.load(one)["distilled"], torch.load(two)["distilled"])]:
        for key, value in a["state"].items():
            torch.testing.assert_close(b["state"][key], value, atol=1e-5, rtol=0)
        for metric in METRICS:
            assert abs(a["history"][0][metric] - b["history"][0][metric]) < 1e-5, metric

    alone, ranks = torch.load(f"{one}.stream"), [torch.load(f"{two}.stream.{rank}") for rank in (0, 1)]
    assert alone["decoded"] == 11 + 4  # every train image once, every test image once
    for rank, got in enumerate(ranks):
        want = shard_sizes(11, ddp_stream.BATCH, rank) + own_batches(4, ddp_stream.EVAL_BATCH, rank)
        assert got["decoded"] == want, rank  # 7 + 3 and 5 + 1 (every rank decoded 15 when it read whole batches)
        for metric in METRICS:
            row, memory, single = got["streamed"][0], got["memory"][0], alone["streamed"][0]
            assert row[metric] == memory[metric], metric  # the same numbers as the in-memory run of two
            assert abs(row[metric] - single[metric]) < 1e-5, metric
    assert [row[metric] for metric in METRICS for row in alone["memory"]] == [
        row[metric] for metric in METRICS for row in alone["streamed"]
    ]


def shard_sizes(n: int, batch: int, rank: int, world: int = 2) -> int:
    """Images rank ``rank`` reads of ``n`` in training batches of ``batch``: its ``torch.tensor_split`` shard of each
    batch, a batch smaller than the world whole."""
    sizes = [min(batch, n - start) for start in range(0, n, batch)]
    return sum(b if b < world else len(torch.arange(b).tensor_split(world)[rank]) for b in sizes)


def own_batches(n: int, batch: int, rank: int, world: int = 2) -> int:
    """Images rank ``rank`` reads of ``n`` in evaluation batches of ``batch``: every world-th batch, from its rank."""
    sizes = [min(batch, n - start) for start in range(0, n, batch)]
    return sum(sizes[rank::world])


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
