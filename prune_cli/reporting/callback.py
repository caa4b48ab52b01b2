"""``SweepTable``: the Hydra callback that checks a ``-m`` sweep's directory before any job and aggregates the
sweep when its last job ends (or when the launcher stops it early).

It alone writes the sweep's own sweep.csv / sweep.md / sweep_summary.* (and plots) into the sweep directory. Exit
codes: 1 when a job failed, is dead (killed), unreadable, interrupted or never started, or the tables cannot be
written; 2 when the sweep directory cannot be written (one line ``error: hydra.sweep.dir: <path>: <why>``)."""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback

from prune_cli.core import distributed
from prune_cli.reporting.aggregate import collect
from prune_cli.reporting.collect import NOT_DONE, jobs_markdown
from prune_cli.reporting.render import emit, summary_markdown, sweep_plots, write_tables
from prune_cli.run.mlflow_tracking import end_sweep


class SweepTable(Callback):
    """Before a multirun, refuse a sweep directory that cannot be written; after it, aggregate its jobs (per job
    and per group) and plot the groups; exit non-zero if any job did not finish."""

    def __init__(self) -> None:
        self.finished = False

    def on_multirun_start(self, config, **kwargs) -> None:
        if not distributed.is_main():
            return
        root = Path(config.hydra.sweep.dir)
        why = unwritable(root)
        if why is not None:
            print(f"error: hydra.sweep.dir: {root}: {why}", file=sys.stderr)
            sys.exit(2)
        # a launcher that stops the sweep (a joblib worker killed) never reaches on_multirun_end: the tables of the
        # jobs that ran are still written, the killed job's as dead, by the command or else when the process exits
        _OPEN.append((self, root))
        atexit.register(self.after_launcher_stopped, root)

    def on_multirun_end(self, config, **kwargs) -> None:
        if not distributed.is_main():  # the other ranks of a distributed sweep wrote into scratch directories
            return
        status = self.finish(Path(config.hydra.sweep.dir))
        if status:
            sys.exit(status)

    def after_launcher_stopped(self, root: Path) -> None:
        if not self.finished and root.is_dir():
            print(f"the sweep stopped before its last job; the jobs in {root}:", file=sys.stderr)
            self.finish(root)

    def finish(self, root: Path) -> int:
        """Write and print the sweep's tables and plots; the exit status (0 all done, 1 otherwise). Every failure
        here is one line and a non-zero status: Hydra would only warn about an exception of a callback."""
        self.finished = True
        if not root.is_dir():
            return 0
        try:
            jobs, summary = collect([root])
            write_tables(root, jobs, summary)
            emit(jobs_markdown([row for _, row in jobs], []) + "\n" + summary_markdown(summary) + "\n")
        except Exception as e:  # noqa: BLE001 - said in one line, never swallowed
            print(f"error: sweep tables: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
            return 1
        failed = bool(summary.missing) or any(row["status"] in NOT_DONE for _, row in jobs)
        try:  # the sweep's parent MLflow run (when its jobs logged to MLflow) ends with the sweep's tables
            end_sweep(root, "FAILED" if failed else "FINISHED")
        except Exception as e:
            print(f"error: logger: the sweep's MLflow run: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
            failed = True
        try:
            written = sweep_plots(summary, root)
            emit(f"plots: {', '.join(p.name for p in written)} in {root}\n" if written else "plots: nothing to plot\n")
        except ImportError as e:  # plots.Unavailable: matplotlib is an optional extra
            emit(f"plots: skipped ({e})\n")
        except Exception as e:  # a figure that cannot be drawn must not hide the tables: said, and a non-zero exit
            print(f"error: plots: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
            failed = True
        return 1 if failed else 0


_OPEN: list[tuple[SweepTable, Path]] = []  # the sweeps started in this process


def tables_of_stopped_sweeps() -> None:
    """Write the tables of sweeps a launcher stopped (the command calls this before its closing line)."""
    while _OPEN:
        table, root = _OPEN.pop()
        table.after_launcher_stopped(root)


def unwritable(root: Path) -> str | None:
    """Why no file can be written into ``root`` (created if missing), or None when one can."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def aggregate(root: Path) -> list[dict]:
    """Write sweep.csv / sweep.md (one row per job) and sweep_summary.csv / sweep_summary.md (one row per group of
    runs that differ only in their seed) into ``root``; returns the job rows."""
    root = Path(root)
    jobs, summary = collect([root])
    write_tables(root, jobs, summary)
    return [row for _, row in jobs]
