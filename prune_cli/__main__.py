"""The command line: ``prune-cli [group=choice ...] [key=value ...]`` (a Hydra app; builds nothing itself).

Bad input ends with one line ``error: <option>: <why>`` and exit code 2
(HYDRA_FULL_ERROR=1 shows the traceback instead). In a ``-m`` sweep a failing
job is recorded as failed in its directory and the sweep goes on.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from .errors import UserError

_HERE = Path(__file__).resolve().parent
# the wheel ships the config as prune_cli/conf; a source checkout keeps it at the top level
CONF_DIR = _HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg) -> None:
    from . import pipeline, report  # imported here so that --help and --cfg stay fast

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweeping = hc.mode == RunMode.MULTIRUN
    try:
        pipeline.run(cfg, run_dir)
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report.write_status(run_dir, "failed", str(e))
        print(f"error: {e}", file=sys.stderr)
        if not sweeping:
            sys.exit(2)
    except Exception as e:  # a bug, not bad input: keep the traceback, but let a sweep go on
        if not sweeping:
            raise
        report.write_status(run_dir, "failed", f"{type(e).__name__}: {e}")
        traceback.print_exc()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
