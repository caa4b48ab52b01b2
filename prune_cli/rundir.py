"""One run directory: its checkpoints (with a schema version), its tables, its status and its owner.

Every finished stage leaves ``checkpoints/<stage>.pt``; a training stage also rewrites its checkpoint
after every epoch, so re-running the same command into the same directory resumes. A directory is
owned by one run at a time (an OS lock on ``run.lock``, released when the process ends, so a dead
run's lock is never in the way) and never takes a run with another config. ``RunDirGuard`` checks
both before Hydra writes anything into the directory.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from . import __version__, distributed, report
from .atomic import save_torch, write_text
from .config import resolve
from .errors import UserError
from .logger import build_logger

# 1: the first format (no "schema" key); 2: adds "schema". Both load the same way.
CHECKPOINT_SCHEMA = 2

# options that may change between a run and its resumption without changing its results
RESUMABLE_DIFFERENCES = (
    "trainer.device",
    "trainer.progress",
    "trainer.threads",
    "trainer.eval_batch_size",
    "logger.name",
    "logger.dir",
    "latency",
    "dataset.stream",  # imagefolder: streamed or in memory, the same batches
    "dataset.workers",
)
# options added after runs were written, with the behaviour those runs had: absent from an old config means this
# (keys are patterns: a stage block's option is added to every stage)
ADDED_OPTIONS = {
    "model.prune_outputs": False,
    "model.last_maxpool": True,
    "prune.step_grid": "linear",
    "prune.residual": False,
    "schedule.*.grda": {"c": 0.005, "mu": 0.51},
    "logger": {"name": "none"},
    "latency": "off",
    # "auto" keeps a resumed run's recorded format, and a run recorded before the option existed trained contiguous
    "trainer.memory_format": "auto",
    "trainer.sync_bn": False,
    "trainer.compile": False,
    "trainer.compile_backend": "inductor",
}


def added_option(name: str):
    return next((value for pattern, value in ADDED_OPTIONS.items() if fnmatch.fnmatchcase(name, pattern)), None)


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


REQUIRED_KEYS = ("config", "stage", "done", "arch", "state_dict", "rows", "histories")
_held_locks: dict[Path, int] = {}  # run directory -> the open, locked run.lock of this process


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


def check_directory(run_dir: Path, config: dict) -> None:
    """Refuse a directory that another live run owns or that holds a run with a different config."""
    run_dir = Path(run_dir)
    owner = lock_owner(run_dir)
    if owner is not None:
        raise UserError("hydra.run.dir", f"{run_dir} is in use by another run ({owner}); wait for it or choose another")
    for path in sorted((run_dir / "checkpoints").glob("*.pt")):
        diff = config_differences(read_run_checkpoint(path)["config"], config)
        if diff:
            raise UserError(
                "hydra.run.dir",
                f"{run_dir} holds a run with a different config "
                f"({', '.join(diff[:5])}); choose another directory, or repeat that run's command "
                "to resume it",
            )
        return


def lock_owner(run_dir: Path) -> str | None:
    """Who holds the directory's lock ("host pid N"), or None when it is free or held by this process."""
    path = Path(run_dir) / "run.lock"
    if Path(run_dir).resolve() in _held_locks or not path.is_file():
        return None
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = json.loads(f.read().decode() or "{}")
                return f"{who.get('host', '?')} pid {who.get('pid', '?')}"
            except ValueError:
                return "unknown process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def acquire(run_dir: Path) -> None:
    """Own ``run_dir`` until this process ends (a second call in the same process is a no-op)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held_locks:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError("hydra.run.dir", f"cannot write {run_dir} ({e.strerror or type(e).__name__})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError("hydra.run.dir", f"{run_dir} is in use by another run ({lock_owner(run_dir)})") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
    _held_locks[run_dir] = fd


def owns(run_dir: Path) -> bool:
    """Whether this process holds ``run_dir``'s lock (only then may it write the directory's status)."""
    return Path(run_dir).resolve() in _held_locks


def release(run_dir: Path) -> None:
    fd = _held_locks.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


class RunDirGuard(Callback):
    """Hydra callback: before Hydra writes ``.hydra/`` and its log, refuse a run directory that is locked by
    another run or holds a different run, and take the lock. A refused command writes nothing there."""

    def on_run_start(self, config, **kwargs) -> None:
        run_dir = Path(config.hydra.run.dir)
        task = {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k != "hydra"}
        try:
            try:
                task = resolve(OmegaConf.create(task))
            except UserError:  # not resolvable: the app itself says so, once it owns the directory
                task = None
            if task is not None:
                check_directory(run_dir, task)
            acquire(run_dir)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


def git_commit() -> str | None:
    """The commit of the prune_cli checkout that runs (an editable install), or None (an installed wheel)."""
    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(trainer_cfg, device: torch.device, recorded: dict | None = None) -> dict:
    """What produced a run's numbers: versions, device, threads, memory format, precision and determinism settings.

    ``recorded``: the provenance of the run being resumed (None: a new run), whose memory format ``auto`` keeps."""
    import torchvision

    from .trainer import resolve_memory_format

    return {
        "prune_cli": __version__,
        "git_commit": git_commit(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None,
        "threads": torch.get_num_threads(),
        "memory_format": resolve_memory_format(trainer_cfg.get("memory_format", "auto"), device, recorded),
        "precision": trainer_cfg.precision,
        "deterministic": bool(trainer_cfg.deterministic),
        "host": socket.gethostname(),
    }


class RunDir:
    def __init__(self, cfg, path: Path):
        self.cfg, self.dir = cfg, Path(path)
        self.ckpt_dir = self.dir / "checkpoints"
        self.config = resolve(cfg)
        self.rows: list[dict] = []
        self.histories: dict[str, list[dict]] = {}
        self.provenance: dict = {}
        self.logger = build_logger(cfg.logger, self.dir)

    def record_provenance(self, device: torch.device) -> None:
        """Write run.json (what this process runs with); every checkpoint it writes carries the same.

        The resolved memory format replaces ``auto`` in ``cfg.trainer``: every stage trains in it (a resumed run in
        the format its checkpoints record)."""
        recorded = None  # a new run: auto resolves for the device
        if any(self.ckpt_dir.glob("*.pt")):  # resumed: as its checkpoints were written (run.json says how)
            previous = self.dir / "run.json"
            recorded = json.loads(previous.read_text()) if previous.is_file() else {}
        self.provenance = provenance(self.cfg.trainer, device, recorded)
        self.cfg.trainer.memory_format = self.provenance["memory_format"]
        write_text(self.dir / "run.json", json.dumps(self.provenance, indent=2) + "\n")

    def checkpoint(self, stage: str) -> dict | None:
        path = self.ckpt_dir / f"{stage}.pt"
        return read_run_checkpoint(path) if path.is_file() else None

    def claim(self) -> None:
        """Own the directory for this run (refused while another run owns it or it holds another run); the other
        ranks of a distributed run use the directory rank 0 owns."""
        if distributed.is_main():
            check_directory(self.dir, self.config)
            acquire(self.dir)

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
        identity = report.identity(self.cfg)
        report.write_csv(self.dir / "results.csv", [{**row, **identity} for row in self.rows])
        report.write_csv(self.dir / "metrics.csv", [h for hist in self.histories.values() for h in hist])
        self.logger.log(self.histories)

    def write_csv(self, name: str, rows: list[dict]) -> None:
        report.write_csv(self.dir / name, rows)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        name = f"{prefix}{k}"
        if name in RESUMABLE_DIFFERENCES:
            continue
        a, b = old.get(k, added_option(name)), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append(name)
    return out
