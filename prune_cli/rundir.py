"""One run directory: its checkpoints (with a schema version), its tables and its status.

Every finished stage leaves ``checkpoints/<stage>.pt``; a training stage also rewrites its checkpoint
after every epoch, so re-running the same command into the same directory resumes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import report
from .atomic import save_torch
from .errors import UserError

# 1: the first format (no "schema" key); 2: adds "schema". Both load the same way.
CHECKPOINT_SCHEMA = 2

# options that may change between a run and its resumption without changing its results
RESUMABLE_DIFFERENCES = ("trainer.device", "trainer.progress", "trainer.threads", "trainer.eval_batch_size")


def load_checkpoint(path: Path | str) -> dict:
    """A prune_cli checkpoint of any schema this version reads (CPU tensors)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    schema = ck.get("schema", 1)
    if schema > CHECKPOINT_SCHEMA:
        raise UserError(
            "init_from",
            f"{path} was written by a newer prune_cli (checkpoint schema {schema}); upgrade prune_cli to read it",
        )
    return ck


class RunDir:
    def __init__(self, cfg, path: Path):
        self.cfg, self.dir = cfg, Path(path)
        self.ckpt_dir = self.dir / "checkpoints"
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.rows: list[dict] = []
        self.histories: dict[str, list[dict]] = {}

    def checkpoint(self, stage: str) -> dict | None:
        path = self.ckpt_dir / f"{stage}.pt"
        return load_checkpoint(path) if path.is_file() else None

    def guard(self) -> None:
        """Refuse a directory that holds checkpoints of a different config: never overwrite other results."""
        for path in sorted(self.ckpt_dir.glob("*.pt")):
            diff = config_differences(load_checkpoint(path)["config"], self.config)
            if diff:
                raise UserError(
                    "hydra.run.dir",
                    f"{self.dir} holds a run with a different config "
                    f"({', '.join(diff[:5])}); choose another directory, or repeat that run's command "
                    "to resume it",
                )
            return

    def save(self, stage: str, models: list, *, done: bool, epoch: int = 0, optimizers=(), extra: dict | None = None):
        """``state_dict`` is the model that continues; ``states`` / ``optimizers`` hold every network of the stage."""
        save_torch(
            self.ckpt_dir / f"{stage}.pt",
            {
                "schema": CHECKPOINT_SCHEMA,
                "config": self.config,
                "stage": stage,
                "done": done,
                "arch": models[0].arch,
                "state_dict": models[0].state_dict(),
                "states": [m.state_dict() for m in models],
                "optimizer": optimizers[0].state_dict() if optimizers else None,
                "optimizers": [o.state_dict() for o in optimizers],
                "epoch": epoch,
                "rows": self.rows,
                "histories": self.histories,
                **(extra or {}),
            },
        )

    def restore(self, ck: dict) -> None:
        """Take a checkpoint's tables (rows and per-epoch histories) as this run's."""
        self.rows, self.histories = list(ck["rows"]), dict(ck["histories"])

    def write_tables(self) -> None:
        identity = report.identity(self.cfg)
        report.write_csv(self.dir / "results.csv", [{**row, **identity} for row in self.rows])
        report.write_csv(self.dir / "metrics.csv", [h for hist in self.histories.values() for h in hist])

    def write_csv(self, name: str, rows: list[dict]) -> None:
        report.write_csv(self.dir / name, rows)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        name = f"{prefix}{k}"
        if name in RESUMABLE_DIFFERENCES:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append(name)
    return out
