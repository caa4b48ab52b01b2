"""Optional extras around runs: a sweep through Hydra's submitit launcher (local executor: parallel processes)
aggregates like any sweep and logs its jobs to one MLflow store as children of one parent run, and
logger=tensorboard mirrors metrics.csv as scalars (read back with TensorBoard's own reader)."""

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import TINY, compose_config, run_cli
from prune_cli.run import pipeline

pytestmark = pytest.mark.slow  # a launcher's processes, and a whole run

# the smallest sweep that still prunes: one epoch of each training stage at a quarter of ResNet-20's width
SMALL = [*TINY, "dataset.image_size=8", "model.width_mult=0.25", "schedule.pretrain.epochs=1"]


def test_submitit_local_sweep_is_aggregated_and_tracked(tmp_path):
    sweep, store = tmp_path / "sweep", f"sqlite:///{tmp_path / 'mlruns.db'}"
    r = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        *SMALL,
        "schedule.finetune.epochs=1",
        "seed=0,1",
        "logger=mlflow_tensorboard",  # MLflow and TensorBoard together
        f"logger.tracking_uri='{store}'",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = pd.read_csv(sweep / "sweep.csv")
    assert list(jobs["job"].astype(str)) == ["0", "1"] and list(jobs["status"]) == ["done", "done"]
    assert list(jobs["seed"]) == [0, 1]
    finals = [pd.read_csv(sweep / str(k) / "results.csv").iloc[-1] for k in (0, 1)]
    for k, final in enumerate(finals):  # each job's row is its own results.csv's final row
        assert jobs.loc[k, "top1"] == final["top1"] and jobs.loc[k, "params"] == final["params"]
    groups = pd.read_csv(sweep / "sweep_summary.csv")  # the two seeds are one group
    assert len(groups) == 1 and groups.loc[0, "n"] == 2
    assert abs(groups.loc[0, "top1_mean"] - (finals[0]["top1"] + finals[1]["top1"]) / 2) < 1e-9

    # tracked: the two jobs, logging side by side into one SQLite store, are child runs of the sweep's parent run
    client = MlflowClient(store)
    parent_id = json.loads((sweep / "mlflow_parent.json").read_text())["run_id"]
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert sorted(c.data.params["seed"] for c in children) == ["0", "1"]
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.metrics["final/top1"] for c in children} == {final["top1"] for final in finals}
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert "sweep.csv" in {a.path for a in client.list_artifacts(parent_id)}
    for job in ("0", "1"):
        assert list((sweep / job / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_scalars_are_the_metrics(tmp_path):
    cfg = compose_config(*SMALL, "schedule.pretrain.epochs=2", "schedule.finetune.epochs=1", "logger=tensorboard")
    pipeline.run(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert len(metrics) == 3  # two pretrain epochs, one finetune epoch
    for _, row in metrics.iterrows():
        for name in ("train_loss", "test_acc", "lr"):
            logged = {e.step: e.value for e in events.Scalars(f"{row['stage']}/{name}")}
            assert abs(logged[row["epoch"]] - row[name]) <= 1e-6 * max(1.0, abs(row[name]))
    assert sorted(events.Tags()["scalars"]) == sorted(
        f"{stage}/{name}"
        for stage in ("pretrain", "finetune")
        for name in metrics.columns
        if name not in ("stage", "epoch") and metrics[name].notna().any()
    )
