"""Experiment tracking (``logger=<name>``), registered by name like the other parts: ``none`` (default),
``tensorboard``, which mirrors every per-epoch row of ``metrics.csv`` as TensorBoard scalars ``<stage>/<metric>``
(``<stage>/net<k>/<metric>`` for grafted networks) at step = the stage's epoch, and ``mlflow`` /
``mlflow_tensorboard`` (``mlflow_tracking.py``). The CSV files stay the source of truth; a logger is a view of them,
fed whenever the run writes its tables, started once the run's checks pass and told how the run ended."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from prune_cli.core.errors import UserError
from prune_cli.core.options import Option, Str, check_block
from prune_cli.core.registry import Registry

LOGGERS = Registry("logger", "logger.name")
NOT_SCALARS = ("stage", "epoch", "net")  # a history row's keys that place it rather than measure it


class Logger:
    """Sees the run's per-epoch histories each time the tables are written; ``skip`` marks rows an earlier
    process wrote (a resumed run, a run started from another run's checkpoint)."""

    options: tuple[Option, ...] = ()

    def __init__(self, run_dir: Path, **options):
        self.run_dir = Path(run_dir)
        for key, value in check_block(options, self.options, "logger").items():
            setattr(self, key, value)
        self.done: set[tuple] = set()

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        """Rules checked before anything runs (``cfg``: the whole checked config)."""

    @staticmethod
    def key(row: dict) -> tuple:
        return row.get("stage"), row.get("epoch"), row.get("net", 0)

    def skip(self, histories: dict[str, list[dict]]) -> None:
        self.done |= {self.key(h) for hist in histories.values() for h in hist}

    def log(self, histories: dict[str, list[dict]]) -> None:
        fresh = [h for hist in histories.values() for h in hist if self.key(h) not in self.done]
        if fresh:
            self.write(fresh)
            self.done |= {self.key(h) for h in fresh}

    def write(self, rows: list[dict]) -> None:
        """Record history rows not recorded before."""

    def start(self, config: dict, earlier: dict) -> dict:
        """The run starts (``config``: its resolved config; ``earlier``: what run.json recorded when the run is
        resumed, else empty); returns what run.json should record of the logger."""
        return {}

    def finish(self, status: str) -> None:
        """The run ends: ``status`` FINISHED, FAILED or KILLED (interrupted)."""


def prefix(row: dict) -> str:
    """Where a history row's metrics go: ``<stage>``, or ``<stage>/net<k>`` for a network of several."""
    return row["stage"] + (f"/net{row['net']}" if "net" in row else "")


@LOGGERS.register("none")
class NoLogger(Logger):
    """The CSV files only."""


@LOGGERS.register("tensorboard")
class TensorBoard(Logger):
    """Per-epoch metrics as TensorBoard scalars (the ``tensorboard`` extra)."""

    options = (Str("dir", "tensorboard", "where the event files go, relative to the run directory"),)
    dir: str

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise UserError("logger.name", "tensorboard is not installed (pip install 'prune-cli[tensorboard]')")

    def __init__(self, run_dir: Path, **options):
        super().__init__(run_dir, **options)
        self.writer = None

    def write(self, rows: list[dict]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # only when asked for: an optional extra

            self.writer = SummaryWriter(str(self.run_dir / self.dir))
        for h in rows:
            for name, value in h.items():
                if name not in NOT_SCALARS and isinstance(value, (int, float)) and value == value:
                    self.writer.add_scalar(f"{prefix(h)}/{name}", value, h["epoch"])
        self.writer.flush()


def build_logger(cfg, run_dir: Path) -> Logger:
    options = {k: v for k, v in cfg.items() if k != "name"}
    return LOGGERS.get(cfg.name)(run_dir, **options)
