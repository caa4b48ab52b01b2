"""``SweepTable``: the Hydra callback that aggregates a ``-m`` sweep when its last job ends."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from prune_cli.core import distributed
from prune_cli.reporting.aggregate import collect
from prune_cli.reporting.collect import NOT_DONE
from prune_cli.reporting.render import SUMMARY_MD, sweep_plots, write_summary


class SweepTable(Callback):
    """After a multirun, aggregate its jobs (per job and per group) and plot the groups; exit non-zero if any job
    did not finish."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if not distributed.is_main():  # the other ranks of a distributed sweep wrote into scratch directories
            return
        root = Path(config.hydra.sweep.dir)
        if not root.is_dir():
            return
        jobs, summary = collect([root])
        write_summary(root, summary)
        print((root / "sweep.md").read_text())
        print((root / SUMMARY_MD).read_text())
        failed = any(row["status"] in NOT_DONE for _, row in jobs)
        try:
            written = sweep_plots(summary, root)
            print(f"plots: {', '.join(p.name for p in written)} in {root}" if written else "plots: nothing to plot")
        except ImportError as e:  # plots.Unavailable: matplotlib is an optional extra
            print(f"plots: skipped ({e})")
        except Exception as e:  # a figure that cannot be drawn must not hide the tables: said, and a non-zero exit
            print(f"error: plots: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
            failed = True
        if failed:
            sys.exit(1)


def aggregate(root: Path) -> list[dict]:
    """Write sweep.csv / sweep.md (one row per job) and sweep_summary.csv / sweep_summary.md (one row per group of
    runs that differ only in their seed) into ``root``; returns the job rows."""
    root = Path(root)
    jobs, summary = collect([root])
    write_summary(root, summary)
    return [row for _, row in jobs]
