"""What produced a run's numbers: versions, commit, device, threads, memory format, precision (``run.json``)."""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
import uuid
from pathlib import Path

import torch

from prune_cli.core.version import __version__
from prune_cli.engine.settings import resolve_memory_format


def git_commit() -> str | None:
    """The commit of the prune_cli checkout that runs (an editable install), or None (an installed wheel)."""
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_id(earlier: dict | None) -> str:
    """A run's unique id (uuid4 hex): the one its earlier run.json recorded (a resumed run keeps it), else a new one.
    Copies of a run directory share it, so reports count them once."""
    recorded = (earlier or {}).get("run_id")
    return recorded if isinstance(recorded, str) and recorded else uuid.uuid4().hex


def provenance(trainer_cfg, device: torch.device, recorded: dict | None = None) -> dict:
    """What produced a run's numbers: versions, device, threads, memory format, precision and determinism settings.

    ``recorded``: the provenance of the run being resumed (None: a new run), whose memory format ``auto`` keeps."""
    return {
        "prune_cli": __version__,
        "git_commit": git_commit(),
        "torch": str(torch.__version__),
        # from the installed package's record: importing torchvision costs every command over a second
        "torchvision": importlib.metadata.version("torchvision"),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None,
        "threads": torch.get_num_threads(),
        "memory_format": resolve_memory_format(trainer_cfg.get("memory_format", "auto"), device, recorded),
        "precision": trainer_cfg.precision,
        "deterministic": bool(trainer_cfg.deterministic),
        "host": socket.gethostname(),
    }
