"""Checkpoints and run directories written before the schema version existed (schema 1, prune_cli before the
registered-parts redesign) still resume and still serve as ``init_from``."""

import shutil

import torch

from helpers import SCHEMA1_OVERRIDES, SCHEMA1_RUN, compose_config, results_table
from prune_cli.core.checkpoint import CHECKPOINT_SCHEMA
from prune_cli.run import pipeline


def test_an_old_run_directory_resumes_to_the_old_table(tmp_path):
    assert "schema" not in torch.load(SCHEMA1_RUN / "checkpoints" / "pretrain.pt", weights_only=True)
    run = tmp_path / "run"
    shutil.copytree(SCHEMA1_RUN / "checkpoints", run / "checkpoints")
    pipeline.run(compose_config(*SCHEMA1_OVERRIDES), run)
    # the finished stages are taken as they were, and the finetune run now gives the old run's final row
    assert results_table(run) == results_table(SCHEMA1_RUN)
    assert torch.load(run / "checkpoints" / "finetune.pt", weights_only=True)["schema"] == CHECKPOINT_SCHEMA


def test_an_old_checkpoint_serves_as_init_from(tmp_path):
    rows = pipeline.run(
        compose_config(*SCHEMA1_OVERRIDES, f"init_from={SCHEMA1_RUN / 'checkpoints' / 'pretrain.pt'}"), tmp_path
    )
    assert [r["stage"] for r in rows] == ["init", "pretrain", "prune", "finetune"]
