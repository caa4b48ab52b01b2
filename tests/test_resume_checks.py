"""What a run starts from is checked: ``init_from`` maps a checkpoint onto the schedule by one rule or refuses it in
one line, and a resumed run refuses data that differ from those its checkpoints were trained on."""

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import TINY
from helpers import compose_config as config
from prune_cli.core.errors import UserError
from prune_cli.run import pipeline

EPOCHS = {"pretrain": 1, "sparse_train": 1, "finetune": 1, "scratch": 1}
TINY_8 = [*TINY, "dataset.image_size=8"]  # what a run starts from is checked alike at any image size


def tiny(*overrides, tiny_data=TINY_8):
    """A tiny run of one epoch per training stage (the schedule's stages, whatever they are)."""
    cfg = config(*tiny_data, *overrides)
    for stage, epochs in EPOCHS.items():
        if stage in cfg.schedule:
            cfg.schedule[stage].epochs = epochs
    return cfg


def digests(folder) -> dict[str, str]:
    """The sha256 of every file under ``folder`` (what must stay as it was)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A default run (pretrain, prune, finetune) and a sparse_finetune one (sparse_train, prune, finetune)."""
    root = tmp_path_factory.mktemp("sources")
    pipeline.run(tiny(), root / "default")
    pipeline.run(tiny("schedule=sparse_finetune", "regularizer=l1"), root / "sparse")
    return root


REFUSED = [
    # a pruned network would be trained again by pretrain and saved as pretrain.pt, next to a second pretrain row
    ("default/checkpoints/prune.pt", ["schedule=pretrain"], r"has been through pretrain already.*\[pretrain\]"),
    # pruned without pretrain among its rows: pretrain trains the network before pruning
    ("sparse/checkpoints/prune.pt", ["schedule=pretrain", "regularizer=l1"], r"pruned.*pretrain of the schedule"),
    # the schedule's only pruning stage is its last: nothing would run, the table would name merge
    ("default/checkpoints/prune.pt", ["schedule=merge"], r"lacks, and nothing of the schedule is left to run"),
    # pruned at ratio 0.5: a table saying ratio=0.3 would mislabel its rows
    ("default/checkpoints/prune.pt", ["prune.ratio=0.3"], r"made with ratio=0.5; this run's table would say ratio=0.3"),
]


@pytest.mark.slow
@pytest.mark.parametrize("source,overrides,why", REFUSED)
def test_init_from_a_checkpoint_the_schedule_cannot_start_from_is_one_line(runs, tmp_path, source, overrides, why):
    before = digests(runs)
    with pytest.raises(UserError, match=why) as e:
        pipeline.run(tiny(*overrides, f"init_from={runs / source}"), tmp_path / "run")
    assert e.value.option == "init_from" and "\n" not in str(e.value) and str(runs / source) in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "results.csv").exists()
    assert digests(runs) == before


@pytest.mark.slow
def test_init_from_a_sparse_checkpoint_starts_the_default_schedule_at_prune(runs, tmp_path):
    sparse = tmp_path / "sparse"
    pipeline.run(tiny("schedule=sparse", "regularizer=l1"), sparse)  # pretrain, sparse_train, prune, scratch
    pipeline.run(tiny("regularizer=l1", f"init_from={sparse / 'checkpoints' / 'sparse_train.pt'}"), tmp_path / "run")
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert list(results["stage"]) == ["init", "pretrain", "sparse_train", "prune", "finetune"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["finetune.pt", "prune.pt"]


@pytest.mark.slow
def test_init_from_a_checkpoint_another_method_pruned_starts_after_the_schedules_pruning(runs, tmp_path):
    merged = tmp_path / "merged"
    pipeline.run(tiny("schedule=merge"), merged)  # pretrain, merge
    pipeline.run(tiny(f"init_from={merged / 'checkpoints' / 'merge.pt'}"), tmp_path / "run")
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert list(results["stage"]) == ["init", "pretrain", "merge", "finetune"]
    assert results.iloc[-1]["params"] == results.iloc[2]["params"]  # finetuned, not pruned again


def make_folder(root, seed=0) -> None:
    """2 classes of 6 train and 2 test random 8x8 RGB PNGs."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 6), ("val", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


FOLDER_RUN = [o for o in TINY if not o.startswith("dataset")] + ["dataset=imagefolder", "dataset.image_size=8"]


@pytest.mark.slow
def test_resuming_against_changed_data_is_refused_before_any_training(tmp_path):
    make_folder(tmp_path / "images")
    cfg = tiny("schedule=pretrain", f"dataset.root={tmp_path / 'images'}", tiny_data=FOLDER_RUN)
    pipeline.run(cfg, tmp_path / "run")
    ck = torch.load(tmp_path / "run" / "checkpoints" / "pretrain.pt", weights_only=True)
    assert isinstance(ck["data_fingerprint"], str) and ck["provenance"]["data"]["fingerprint"] == ck["data_fingerprint"]
    pipeline.run(cfg, tmp_path / "run")  # the same files: resumes (nothing left to run)
    before = digests(tmp_path / "run")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "images" / "train" / "a" / "0.png")  # one image changed
    with pytest.raises(UserError, match=r"the data differ from those the run's checkpoints were trained on \(") as e:
        pipeline.run(cfg, tmp_path / "run")
    assert e.value.option == "dataset.root" and "\n" not in str(e.value)
    after = digests(tmp_path / "run")
    assert {k: v for k, v in after.items() if k != "run.json"} == {k: v for k, v in before.items() if k != "run.json"}


@pytest.mark.slow
def test_a_checkpoint_without_a_fingerprint_resumes_as_before(tmp_path):
    make_folder(tmp_path / "images")
    cfg = tiny("schedule=pretrain", f"dataset.root={tmp_path / 'images'}", tiny_data=FOLDER_RUN)
    pipeline.run(cfg, tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "pretrain.pt"
    ck = torch.load(path, weights_only=True)
    del ck["data_fingerprint"]  # as written before fingerprints were recorded
    torch.save(ck, path)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "images" / "train" / "a" / "0.png")
    assert [r["stage"] for r in pipeline.run(cfg, tmp_path / "run")] == ["init", "pretrain"]


@pytest.mark.slow
def test_the_command_exits_2_on_a_refused_start(tmp_path, command):
    """The refusals above as the user meets them: one line on stderr, exit code 2, the run's files unchanged (through
    the entry point in this process: a new interpreter for each of the four commands would add seconds, no check)."""
    make_folder(tmp_path / "images")
    run = ["schedule=pretrain", "schedule.pretrain.epochs=1", f"dataset.root={tmp_path / 'images'}", *FOLDER_RUN]
    first = command(*run, f"hydra.run.dir={tmp_path / 'run'}")
    assert first.returncode == 0, first.stderr
    before = digests(tmp_path / "run" / "checkpoints")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "images" / "val" / "b" / "1.png")
    changed = command(*run, f"hydra.run.dir={tmp_path / 'run'}")
    assert changed.returncode == 2
    assert changed.stderr.strip().startswith("error: dataset.root: the data differ from those the run's checkpoints")
    assert len(changed.stderr.strip().splitlines()) == 1 and digests(tmp_path / "run" / "checkpoints") == before
    epochs = ["schedule.pretrain.epochs=1", "schedule.finetune.epochs=1"]
    pruned = command(*TINY, *epochs, f"hydra.run.dir={tmp_path / 'prune'}")
    assert pruned.returncode == 0, pruned.stderr
    source = tmp_path / "prune" / "checkpoints" / "prune.pt"
    before = digests(tmp_path / "prune")
    again = command(*TINY, "schedule=pretrain", f"init_from={source}", f"hydra.run.dir={tmp_path / 'again'}")
    assert again.returncode == 2 and again.stderr.strip().startswith("error: init_from: ")
    assert "[pretrain]" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert digests(tmp_path / "prune") == before and not (tmp_path / "again" / "checkpoints").exists()
