"""Checkpoints and run directories written before the schema version existed (schema 1, prune_cli before the
registered-parts redesign) still resume and still serve as ``init_from``."""

import shutil
from pathlib import Path

import torch

from helpers import compose_config, results_table
from prune_cli import pipeline
from prune_cli.rundir import CHECKPOINT_SCHEMA

OLD_RUN = Path(__file__).resolve().parent / "data" / "run_schema1"  # pretrain + prune done, finetune not run
OVERRIDES = [
    "dataset=synthetic",
    "dataset.train_size=64",
    "dataset.test_size=32",
    "dataset.image_size=8",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=32",
    "trainer.progress=false",
    "model.width_mult=0.25",
    "schedule.pretrain.epochs=1",
    "schedule.finetune.epochs=1",
]


def test_an_old_run_directory_resumes_to_the_old_table(tmp_path):
    assert "schema" not in torch.load(OLD_RUN / "checkpoints" / "pretrain.pt", weights_only=True)
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN / "checkpoints", run / "checkpoints")
    pipeline.run(compose_config(*OVERRIDES), run)
    # the finished stages are taken as they were, and the finetune run now gives the old run's final row
    assert results_table(run) == results_table(OLD_RUN)
    assert torch.load(run / "checkpoints" / "finetune.pt", weights_only=True)["schema"] == CHECKPOINT_SCHEMA


def test_an_old_checkpoint_serves_as_init_from(tmp_path):
    rows = pipeline.run(compose_config(*OVERRIDES, f"init_from={OLD_RUN / 'checkpoints' / 'pretrain.pt'}"), tmp_path)
    assert [r["stage"] for r in rows] == ["init", "pretrain", "prune", "finetune"]
