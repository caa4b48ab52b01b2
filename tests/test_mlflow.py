"""MLflow tracking (``logger=mlflow``), read back through ``MlflowClient`` from one SQLite store the module's tests
share: a run's params, metrics, tags and artifacts; a resumed run continuing its MLflow run; a store that cannot be
written refused in one line at start. (A parallel sweep's jobs nested under one parent run: test_launchers.py.)"""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from helpers import TINY, compose_config, run_interrupted
from prune_cli.core.errors import UserError
from prune_cli.run import pipeline


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The module's tracking store: a SQLite file made once (its tables take seconds to create)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns.db'}"


def tiny(store, *overrides):
    return compose_config(
        *TINY,
        "schedule.pretrain.epochs=2",
        "schedule.finetune.epochs=1",
        "logger=mlflow",
        f"logger.tracking_uri={store}",
        *overrides,
    )


def recorded_run(client, run_dir):
    return client.get_run(json.loads((run_dir / "run.json").read_text())["mlflow_run_id"])


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_a_run_logs_its_config_metrics_tags_and_tables(store, tmp_path):
    pipeline.run(tiny(store), tmp_path)
    client = MlflowClient(store)
    run = recorded_run(client, tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["schedule.finetune.lr"] == "0.01" and run.data.params["prune.ratio"] == "0.5"
    assert run.data.params["schedule.stages"] == '["pretrain", "prune", "finetune"]'
    assert steps(client, run.info.run_id, "pretrain/train_loss") == [1, 2]
    assert steps(client, run.info.run_id, "finetune/test_acc") == [1]
    results = (tmp_path / "results.csv").read_text().splitlines()
    assert run.data.metrics["final/params"] == float(results[-1].split(",")[4])
    tags = run.data.tags
    assert (tags["model"], tags["dataset"], tags["method"], tags["stage"]) == (
        "resnet20",
        "synthetic",
        "l1",
        "finetune",
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.csv", "metrics.csv", "summary.md", "run.json"} <= artifacts


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run(store, tmp_path, monkeypatch):
    run_interrupted(tiny(store), tmp_path, monkeypatch, at_epoch=2)  # Ctrl-C in the second pretrain epoch
    client = MlflowClient(store)
    first = recorded_run(client, tmp_path)
    assert first.info.status == "KILLED" and steps(client, first.info.run_id, "pretrain/train_loss") == [1]
    pipeline.run(tiny(store), tmp_path)
    again = recorded_run(client, tmp_path)
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    assert steps(client, again.info.run_id, "pretrain/train_loss") == [1, 2]  # every epoch once


def test_a_store_that_cannot_be_written_is_one_line_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.Context, "data", property(lambda self: pytest.fail("the data were read")))
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError) as e:
        pipeline.run(tiny(f"sqlite:///{tmp_path / 'file' / 'mlruns.db'}"), tmp_path / "run")
    assert e.value.option == "logger.tracking_uri" and "cannot write the MLflow store" in e.value.why
    assert not list((tmp_path / "run").glob("checkpoints/*"))
