"""One run directory: its checkpoints, its tables and its claim.

Every finished stage leaves ``checkpoints/<stage>.pt``; a training stage also rewrites its checkpoint
after every epoch, so re-running the same command into the same directory resumes. A directory is
owned by one run at a time (``lock``) and never takes a run with another config (``resumable``).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from prune_cli.core import distributed
from prune_cli.core.atomic import save_torch, write_text
from prune_cli.core.checkpoint import CHECKPOINT_SCHEMA, load_checkpoint
from prune_cli.core.errors import UserError, one_line
from prune_cli.run import tables
from prune_cli.run.config import resolve
from prune_cli.run.lock import acquire, lock_owner
from prune_cli.run.logger import build_logger
from prune_cli.run.provenance import provenance, run_id
from prune_cli.run.resumable import config_differences, settled_on_resume

REQUIRED_KEYS = ("config", "stage", "done", "arch", "state_dict", "rows", "histories")


def read_run_checkpoint(path: Path) -> dict:
    """A checkpoint of the run directory, or one line naming it and what to do when it is damaged."""
    stage = path.stem
    try:
        ck = load_checkpoint(path)
    except UserError:
        raise
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise UserError(
            "hydra.run.dir", f"{path} cannot be read ({why}); delete it to recompute the {stage} stage"
        ) from None
    missing = [k for k in REQUIRED_KEYS if k not in ck]
    if missing:
        raise UserError(
            "hydra.run.dir", f"{path} is incomplete (no {', '.join(missing)}); delete it to recompute the {stage} stage"
        )
    return ck


def recorded_config(run_dir: Path) -> dict | None:
    """The config the run in ``run_dir`` recorded in its first checkpoint, or None when it has none yet."""
    for path in sorted((Path(run_dir) / "checkpoints").glob("*.pt")):
        return read_run_checkpoint(path)["config"]
    return None


def check_directory(run_dir: Path, config: dict, recorded: dict | None = None) -> None:
    """Refuse a directory that another live run owns or that holds a run with a different config (``recorded``:
    its config, when the caller has read it already)."""
    run_dir = Path(run_dir)
    owner = lock_owner(run_dir)
    if owner is not None:
        raise UserError("hydra.run.dir", f"{run_dir} is in use by another run ({owner}); wait for it or choose another")
    recorded = recorded if recorded is not None else recorded_config(run_dir)
    diff = config_differences(recorded, config) if recorded is not None else []
    if diff:
        raise UserError(
            "hydra.run.dir",
            f"{run_dir} holds a run with a different config "
            f"({', '.join(diff[:5])}); choose another directory, or repeat that run's command "
            "to resume it",
        )


class RunDir:
    def __init__(self, cfg, path: Path):
        self.cfg, self.dir = cfg, Path(path)
        self.ckpt_dir = self.dir / "checkpoints"
        self.config = resolve(cfg)
        self.rows: list[dict] = []
        self.histories: dict[str, list[dict]] = {}
        self.provenance: dict = {}
        self.data_fingerprint: str | None = None  # of the data this run trains on, once known (``check_data``)
        self.resumed_from: dict = {}  # run.json as an earlier process of this run wrote it (``record_provenance``)
        self.logger = build_logger(cfg.logger, self.dir)

    def record_provenance(self, device: torch.device) -> None:
        """Write run.json (what this process runs with); every checkpoint it writes carries the same.

        The resolved memory format replaces ``auto`` in ``cfg.trainer``: every stage trains in it (a resumed run in
        the format its checkpoints record)."""
        previous = self.dir / "run.json"
        earlier = json.loads(previous.read_text()) if previous.is_file() else {}
        # a new run: auto resolves for the device; resumed: as its checkpoints were written (run.json says how)
        recorded = earlier if any(self.ckpt_dir.glob("*.pt")) else None
        self.provenance = {"run_id": run_id(earlier), **provenance(self.cfg.trainer, device, recorded)}
        self.cfg.trainer.memory_format = self.provenance["memory_format"]
        if recorded and "data" in recorded:  # what the run read stays recorded until it reads the data again
            self.provenance["data"] = recorded["data"]
        self.resumed_from = recorded or {}
        write_text(self.dir / "run.json", json.dumps(self.provenance, indent=2) + "\n")

    def start_logging(self) -> None:
        """Start the run's logger, as the run recorded it when resumed (an MLflow run continues), and record in
        run.json what it says of itself."""
        started = self.logger.start(self.config, self.resumed_from)
        if started:
            self.provenance.update(started)
            if distributed.is_main():
                write_text(self.dir / "run.json", json.dumps(self.provenance, indent=2) + "\n")

    @contextlib.contextmanager
    def tracked(self):
        """Tell the run's logger how the run ends: FINISHED, FAILED (an error) or KILLED (interrupted)."""
        try:
            yield
        except Exception:
            self.finish_logging("FAILED")
            raise
        except BaseException:
            self.finish_logging("KILLED")
            raise
        self.finish_logging("FINISHED")

    def finish_logging(self, status: str) -> None:
        """End the logger's record of the run; a tracking store that fails now is a note, never the run's error."""
        try:
            self.logger.finish(status)
        except Exception as e:
            print(f"note: logger: the run's tracking record could not be closed ({one_line(e)})", file=sys.stderr)

    def check_data(self, fingerprint: str) -> None:
        """Refuse data that differ from those the run's checkpoints were trained on (a checkpoint written before
        fingerprints were recorded says nothing); the checkpoints written from now on record ``fingerprint``."""
        for path in sorted(self.ckpt_dir.glob("*.pt")):
            recorded = read_run_checkpoint(path).get("data_fingerprint")
            if recorded is None:
                continue
            if recorded != fingerprint:
                raise UserError(
                    "dataset.root",
                    f"the data differ from those the run's checkpoints were trained on ({path} records data "
                    f"{recorded}, the files now give {fingerprint}); restore those files, or start a new run in "
                    "another directory",
                )
            break  # every checkpoint of the run was checked against the same data when it was written
        self.data_fingerprint = fingerprint

    def record_data(self, data: dict) -> None:
        """Add what the run read (the root given, the folder read, the fingerprint) to run.json and its checkpoints."""
        self.provenance["data"] = data
        if distributed.is_main():
            write_text(self.dir / "run.json", json.dumps(self.provenance, indent=2) + "\n")

    def checkpoint(self, stage: str) -> dict | None:
        path = self.ckpt_dir / f"{stage}.pt"
        return read_run_checkpoint(path) if path.is_file() else None

    def claim(self) -> None:
        """Own the directory for this run (refused while another run owns it or it holds another run); the other
        ranks of a distributed run use the directory rank 0 owns."""
        recorded = recorded_config(self.dir)  # read once: the check and the settling below use it
        if distributed.is_main():
            check_directory(self.dir, self.config, recorded)
            acquire(self.dir)
        if recorded is not None:  # resumed: an option left at auto runs as recorded
            for name, value in settled_on_resume(recorded, self.config).items():
                OmegaConf.update(self.cfg, name, value)
            self.config = resolve(self.cfg)

    def save(self, stage: str, models: list, *, done: bool, epoch: int = 0, optimizers=(), extra: dict | None = None):
        """``state_dict`` is the model that continues; ``states`` / ``optimizers`` hold every network of the stage."""
        save_torch(
            self.ckpt_dir / f"{stage}.pt",
            {
                "schema": CHECKPOINT_SCHEMA,
                "provenance": self.provenance,
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
                "data_fingerprint": self.data_fingerprint,  # None: this process read no data (see check_data)
                **(extra or {}),
            },
        )

    def restore(self, ck: dict) -> None:
        """Take a checkpoint's tables (rows and per-epoch histories) as this run's."""
        self.rows, self.histories = list(ck["rows"]), dict(ck["histories"])
        self.logger.skip(self.histories)  # logged by the process that wrote them

    def write_tables(self) -> None:
        if not distributed.is_main():
            return
        identity = tables.identity(self.cfg)
        tables.write_csv(self.dir / "results.csv", [{**row, **identity} for row in self.rows])
        tables.write_csv(self.dir / "metrics.csv", [h for hist in self.histories.values() for h in hist])
        self.logger.log(self.histories)

    def write_csv(self, name: str, rows: list[dict]) -> None:
        tables.write_csv(self.dir / name, rows)
