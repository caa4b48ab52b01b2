"""The command line: ``prune-cli [group=choice ...] [key=value ...]`` (a Hydra app; builds nothing itself).

Every way a run can end leaves its ``status.json`` true and prints one line:

- bad input: ``error: <option>: <why>``, status ``failed``, exit 2 (also ``sys.exit`` called by code the run
  calls, e.g. a ``model=custom`` factory);
- a full disk: ``error: <path>: no space left on device``, exit 2 (no partial file is left; docs/endings.md);
- a crash: ``error: <Type>: <message>``, status ``failed``, the traceback in ``traceback.txt``, exit 1;
- Ctrl-C / SIGTERM: ``interrupted``, status ``interrupted``, exit 130 / 143.

Under ``torchrun`` every process runs this; rank 0 alone writes and prints (``distributed.py``).

Hydra's own errors (an unknown key or choice, an override it cannot parse) are one line too, ``error: <key>: <why>``,
exit 2; so is a launcher that stops a ``-m`` sweep (a killed joblib worker), after the sweep's tables, exit 1.

Finished stages' checkpoints and tables stay intact, so the same command resumes. HYDRA_FULL_ERROR=1
re-raises instead. In a ``-m`` sweep a failing job is recorded in its directory and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode

from prune_cli.core import distributed
from prune_cli.core.errors import UserError
from prune_cli.reporting import callback
from prune_cli.run import lock, objective, pipeline, tables

# main() has Hydra raise what it would print as a traceback; the user's own HYDRA_FULL_ERROR is kept here (the
# launcher's worker processes inherit it)
USER_FULL_ERROR = "_PRUNE_CLI_USER_HYDRA_FULL_ERROR"

_PACKAGE = Path(__file__).resolve().parent.parent
# the wheel ships the config as prune_cli/conf; a source checkout keeps it at the top level
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so the run stops where it is."""


def _on_sigterm(signum, frame):
    raise Terminated()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg) -> float | None:
    """One run; returns its objective (``objective``: what a sweeper such as Optuna's maximises), None if it failed."""
    hc = HydraConfig.get()
    run_dir = distributed.shared(Path(hc.runtime.output_dir))  # every rank works in rank 0's directory
    sweeping = hc.mode == RunMode.MULTIRUN
    full_error = os.environ.get(USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR")) == "1"

    def record(status: str, why: str) -> None:
        if lock.owns(run_dir):  # a directory refused because another run owns it is left as it is
            # a full disk: the line on stderr says it, and the record it could not replace stays whole
            with contextlib.suppress(UserError, OSError):
                tables.write_status(run_dir, status, why)

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    rows = None
    try:
        rows = pipeline.run(cfg, run_dir)
    except UserError as e:
        if full_error:
            raise
        record("failed", str(e))
        say(f"error: {e}")
        if not sweeping:
            sys.exit(2)
    except SystemExit as e:  # code the run calls (a user's factory, a hook) is not the command: a failed run
        if full_error:
            raise
        record("failed", f"sys.exit({e.code!r}) called during the run")
        say(f"error: sys.exit({e.code!r}) called during the run")
        if not sweeping:
            sys.exit(2)
    except (KeyboardInterrupt, Terminated) as e:
        record("interrupted", "SIGTERM" if isinstance(e, Terminated) else "SIGINT")
        say(f"interrupted: {run_dir} keeps its finished stages; run the same command to resume")
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except Exception as e:  # a bug, not bad input: one line here, the traceback beside the run
        if full_error:
            raise
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        record("failed", why)
        if lock.owns(run_dir):
            with contextlib.suppress(OSError):  # a full disk must not turn the one line into a traceback
                (run_dir / "traceback.txt").write_text(traceback.format_exc())
        if distributed.is_main():
            print(f"error: {why} (traceback in {run_dir / 'traceback.txt'})", file=sys.stderr)
        else:  # a crash on another rank is its own: say which
            print(f"error: rank {distributed.rank()}: {why}", file=sys.stderr)
        if not sweeping:
            sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.release(run_dir)
    return None if rows is None else objective.value(rows, cfg.objective)


def say(line: str) -> None:
    """A run's one closing line on stderr (rank 0's alone in a distributed run: the others' would repeat it)."""
    if distributed.is_main():
        print(line, file=sys.stderr)


def hydra_error(e: Exception) -> str:
    """One line for an error Hydra raises around the runs: a config it cannot compose, or a launcher that stopped."""
    if isinstance(e, MissingConfigException) and "/" in (e.missing_cfg_file or ""):
        group, choice = e.missing_cfg_file.rsplit("/", 1)
        return f"{group}: no choice '{choice}' (available: {', '.join(e.options or [])})"
    if not isinstance(e, HydraException):  # jobs catch their own errors: this one is the launcher's
        return f"hydra.launcher: {type(e).__name__}: {str(e).strip()}".splitlines()[0]
    key = getattr(e.__cause__, "full_key", None) or "hydra"
    if isinstance(e, OverrideParseException):
        key = e.override
    return f"{key}: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def main() -> None:
    distributed.start()  # before Hydra: under torchrun, ranks other than 0 get a scratch output directory
    user_full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ[USER_FULL_ERROR] = user_full_error or "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app()
    except Exception as e:
        if user_full_error == "1":
            raise
        callback.tables_of_stopped_sweeps()
        say(f"error: {hydra_error(e)}")
        sys.exit(2 if isinstance(e, HydraException) else 1)
    finally:
        del os.environ[USER_FULL_ERROR]
        if user_full_error is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_full_error


if __name__ == "__main__":
    main()
