"""``RunDirGuard``: the Hydra callback that refuses a run directory another live run owns or that holds another
run, and takes its lock, before Hydra writes anything into it."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from prune_cli.core.errors import UserError
from prune_cli.run.config import resolve
from prune_cli.run.lock import acquire
from prune_cli.run.rundir import check_directory


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
        except OSError as e:  # reading the directory failed: say so, not "in use"
            print(f"error: hydra.run.dir: cannot read {run_dir} ({e.strerror or type(e).__name__})", file=sys.stderr)
            sys.exit(2)
