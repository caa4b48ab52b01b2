"""MLflow tracking (``logger=mlflow``; ``logger=mlflow_tensorboard`` writes TensorBoard's scalars too).

One MLflow run per prune_cli run: the composed config, flattened, as params (``schedule.finetune.lr``); every
per-epoch row of ``metrics.csv`` as metrics ``<stage>/<metric>`` at step = the stage's epoch; tags ``model``,
``dataset``, ``method`` (the regularizer and criterion that act) and ``stage`` (the last finished one); and, when
the run ends, its tables (``results.csv``, ``metrics.csv``, ``summary.md``, ``run.json``) and plots as artifacts,
with the run's status (FINISHED, FAILED, KILLED). The store defaults to the SQLite file ``mlruns.db`` in the
directory the command started from (artifacts beside it in ``mlartifacts/``); ``logger.tracking_uri`` takes any.

The run's id is recorded in ``run.json``: a resumed run continues the same MLflow run. The jobs of a ``-m`` sweep
are child runs of one parent run per sweep directory (its id in ``<sweep>/mlflow_parent.json``, made by the first
job under a lock, so parallel jobs share it); the sweep callback ends it with the sweep's tables. A store that
cannot be written is one line naming ``logger.tracking_uri`` when the run starts, before any data is read. Parallel
jobs make a SQLite store's tables one at a time (a lock file beside it), and writes that find the file locked are
retried.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): parallel jobs rely on the retries alone
    fcntl = None

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from prune_cli.core import distributed
from prune_cli.core.atomic import write_text
from prune_cli.core.errors import UserError, one_line
from prune_cli.core.options import Str
from prune_cli.run.logger import LOGGERS, NOT_SCALARS, Logger, TensorBoard, prefix
from prune_cli.run.tables import flatten, identity

PARENT_FILE = "mlflow_parent.json"  # in a sweep directory: the parent run of its jobs
ARTIFACTS = ("results.csv", "metrics.csv", "summary.md", "run.json")
FINAL = ("top1", "best_top1", "params", "macs")  # results.csv columns of the last row logged as final/<column>
RETRIES = 20  # attempts of a store write that finds the SQLite file locked (0.25 s apart, growing)
OPTIONS = (
    Str(
        "tracking_uri",
        None,
        "the MLflow store (any tracking URI); null: sqlite:///<the directory the command started from>/mlruns.db",
        nullable=True,
    ),
    Str("experiment", "prune_cli", "the MLflow experiment the runs go to (made if missing)"),
)


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def quiet() -> None:
    """Keep MLflow's and Alembic's progress lines (making the SQLite tables) off the run's output."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def retried(call, *args, **kwargs):
    """``call(*args, **kwargs)``, again while a parallel job holds the SQLite file's lock."""
    for attempt in range(RETRIES):
        try:
            return call(*args, **kwargs)
        except Exception as e:
            if "locked" not in str(e).lower() or attempt == RETRIES - 1:
                raise
            time.sleep(0.25 * (1 + attempt))


@contextlib.contextmanager
def creating(uri: str):
    """Hold an exclusive lock beside a SQLite store's file (``<file>.lock``) while the block runs, so that jobs
    starting together do not make its tables twice (elsewhere, and without POSIX locks, nothing is held)."""
    if not uri.startswith("sqlite:///") or fcntl is None:
        yield
        return
    path = Path(uri[len("sqlite:///") :])
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Store:
    """A client of one tracking URI and its experiment; ``UserError`` naming the option when it cannot be used."""

    def __init__(self, uri: str | None, experiment: str):
        from mlflow.tracking import MlflowClient

        quiet()
        self.uri = uri or default_uri()
        try:
            with creating(self.uri):  # parallel jobs: one at a time makes the file's tables and the experiment
                self.client = MlflowClient(tracking_uri=self.uri)
                found = retried(self.client.get_experiment_by_name, experiment)
                self.experiment = (
                    found.experiment_id
                    if found is not None
                    else retried(self.client.create_experiment, experiment, artifact_location=self.artifact_root())
                )
        except Exception as e:
            why = f"cannot write the MLflow store {self.uri} ({one_line(e)})"
            raise UserError("logger.tracking_uri", why) from None

    def artifact_root(self) -> str | None:
        """A SQLite store keeps artifacts in ``mlartifacts/`` beside its file; other stores decide themselves."""
        if not self.uri.startswith("sqlite:///"):
            return None
        return (Path(self.uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()

    def new_run(self, name: str, tags: dict) -> str:
        return retried(self.client.create_run, self.experiment, tags=tags, run_name=name).info.run_id


def sweep_parent(store: Store, sweep: Path) -> str:
    """The parent run of the sweep in ``sweep``: made by the first job (under an exclusive lock file), read by the
    others."""
    record = sweep / PARENT_FILE
    try:
        fd = os.open(sweep / f".{PARENT_FILE}.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        for _ in range(600):  # the first job is making it: wait for its record (a minute at most)
            if record.is_file():
                return json.loads(record.read_text())["run_id"]
            time.sleep(0.1)
        raise UserError("logger.name", f"the sweep's parent MLflow run was never recorded in {record}") from None
    os.close(fd)
    run_id = store.new_run(sweep.name, {"prune_cli.sweep_dir": str(sweep)})
    write_text(record, json.dumps({"run_id": run_id, "tracking_uri": store.uri}) + "\n")
    return run_id


def sweep_dir() -> Path | None:
    """The directory of the ``-m`` sweep this process runs a job of, or None."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).resolve() if hc.mode == RunMode.MULTIRUN else None


@LOGGERS.register("mlflow")
class MLflow(Logger):
    """Params, per-epoch metrics, tags and the tables as artifacts in an MLflow store (the ``tracking`` extra)."""

    options = OPTIONS
    tracking_uri: str | None
    experiment: str

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise UserError("logger.name", "mlflow is not installed (pip install 'prune-cli[tracking]')")

    def __init__(self, run_dir: Path, **options):
        super().__init__(run_dir, **options)
        self.store, self.run_id = None, None

    def start(self, config: dict, earlier: dict) -> dict:
        """Connect (one line when the store cannot be written), continue the MLflow run ``run.json`` recorded
        (``earlier``) or make one with the config's params; returns what run.json records."""
        if not distributed.is_main():
            return {}
        self.store = Store(self.tracking_uri, self.experiment)
        try:
            return self.open_run(config, earlier)
        except UserError:
            raise
        except Exception as e:
            raise UserError(
                "logger.tracking_uri", f"cannot write the MLflow store {self.store.uri} ({one_line(e)})"
            ) from None

    def open_run(self, config: dict, earlier: dict) -> dict:
        client, known = self.store.client, earlier.get("mlflow_run_id")
        if known is not None and self.store.uri == earlier.get("mlflow_tracking_uri"):
            self.run_id = known
            retried(client.update_run, known, status="RUNNING")
            return {"mlflow_run_id": known, "mlflow_tracking_uri": self.store.uri}
        sweep = sweep_dir()
        tags = {**run_tags(config), "prune_cli.run_dir": str(self.run_dir.resolve())}
        if sweep is not None:
            tags["mlflow.parentRunId"] = sweep_parent(self.store, sweep)
        self.run_id = self.store.new_run(self.run_dir.name, tags)
        self.log_params({name: str(value)[:6000] for name, value in flatten(config).items()})  # MLflow's limit
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.store.uri}

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            retried(self.store.client.log_batch, self.run_id, params=items[i : i + 100])

    def write(self, rows: list[dict]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [
            Metric(f"{prefix(h)}/{name}", float(value), now, h["epoch"])
            for h in rows
            for name, value in h.items()
            if name not in NOT_SCALARS and isinstance(value, (int, float)) and value == value
        ]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a batch
            retried(self.store.client.log_batch, self.run_id, metrics=metrics[i : i + 1000])
        retried(self.store.client.log_batch, self.run_id, tags=[RunTag("stage", rows[-1]["stage"])])

    def finish(self, status: str) -> None:
        """The run's tables and plots as artifacts, and its end: ``status`` FINISHED, FAILED or KILLED."""
        if self.run_id is None:
            return
        self.log_final()
        files = [self.run_dir / name for name in ARTIFACTS] + sorted(self.run_dir.glob("*.png"))
        for path in files:
            if path.is_file():
                retried(self.store.client.log_artifact, self.run_id, str(path))
        retried(self.store.client.set_terminated, self.run_id, status=status)

    def log_final(self) -> None:
        """The last row of ``results.csv`` as metrics ``final/<column>`` (top-1, params, MACs, speed-ups): what runs
        are compared by in the tracking UI."""
        from mlflow.entities import Metric

        results = self.run_dir / "results.csv"
        if not results.is_file():
            return
        last, now = pd.read_csv(results).iloc[-1], int(time.time() * 1000)
        wanted = [c for c in last.index if c in FINAL or c.startswith("speedup_")]
        metrics = [
            Metric(f"final/{c}", float(last[c]), now, 0)
            for c in wanted
            if pd.notna(pd.to_numeric(last[c], errors="coerce"))
        ]
        if metrics:
            retried(self.store.client.log_batch, self.run_id, metrics=metrics)


@LOGGERS.register("mlflow_tensorboard")
class MLflowAndTensorBoard(MLflow):
    """``mlflow`` and ``tensorboard`` together: the MLflow run, and the scalars in ``logger.dir``."""

    options = OPTIONS + TensorBoard.options

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        MLflow.check_config(cfg)
        TensorBoard.check_config(cfg)

    def __init__(self, run_dir: Path, **options):
        super().__init__(run_dir, **options)
        self.board = TensorBoard(run_dir, dir=self.dir)

    def write(self, rows: list[dict]) -> None:
        super().write(rows)
        self.board.write(rows)


def run_tags(config: dict) -> dict[str, str]:
    """``model``, ``dataset`` and ``method``: the regularizer and criterion that act, joined by ``+``."""
    ident = identity(OmegaConf.create(config))
    acting = [ident["regularizer"], ident["criterion"]]
    method = "+".join(part for part in acting if part not in ("none", "-")) or "none"
    return {"model": str(ident["model"]), "dataset": str(ident["dataset"]), "method": method}


def end_sweep(root: Path, status: str) -> None:
    """End the parent MLflow run of the sweep in ``root`` (if its jobs logged to MLflow), with the sweep's
    tables as its artifacts."""
    record = Path(root) / PARENT_FILE
    if not record.is_file():
        return
    from mlflow.tracking import MlflowClient

    quiet()
    parent = json.loads(record.read_text())
    client = MlflowClient(tracking_uri=parent["tracking_uri"])
    for path in sorted(Path(root).glob("sweep*")):
        if path.is_file():
            retried(client.log_artifact, parent["run_id"], str(path))
    retried(client.set_terminated, parent["run_id"], status=status)
