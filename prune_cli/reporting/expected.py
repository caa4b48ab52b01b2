"""A sweep's jobs that never started: the jobs its own overrides ask for (Hydra's ``multirun.yaml`` in the sweep
directory) less those whose directory holds ``.hydra/overrides.yaml``."""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"  # the only sweeper whose jobs we can list
JOB_NUMBER_SUBDIR = "${hydra.job.num}"  # Hydra's default job directory name: the job's number


def expected_jobs(root: Path) -> list[tuple[str, list[str]]] | None:
    """(name, overrides) of every job the sweep in ``root`` asks for, in Hydra's order, as the basic sweeper splits
    the sweep's params and command-line overrides; None when ``root`` is no sweep of the basic sweeper (or its
    multirun.yaml cannot be read)."""
    path = Path(root) / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        hydra = OmegaConf.load(path).hydra
        if hydra.sweeper.get("_target_") != BASIC_SWEEPER:
            return None
        params = hydra.sweeper.get("params") or {}
        arguments = [f"{k}={v}" for k, v in params.items()] + list(hydra.overrides.task)
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
        numbered = OmegaConf.to_container(hydra.sweep, resolve=False).get("subdir") == JOB_NUMBER_SUBDIR
    except (OSError, ValueError, OmegaConfBaseException, HydraException, yaml.YAMLError):
        return None
    jobs = [overrides for batch in batches for overrides in batch]
    return [(str(i) if numbered else " ".join(o), o) for i, o in enumerate(jobs)]


def started_overrides(run_dir: Path) -> tuple[str, ...] | None:
    """The overrides a started job ran with (its .hydra/overrides.yaml, sorted), or None."""
    try:
        return tuple(sorted(str(o) for o in OmegaConf.load(Path(run_dir) / ".hydra" / "overrides.yaml")))
    except (OSError, ValueError, OmegaConfBaseException, yaml.YAMLError):
        return None


def missing_jobs(root: Path, run_dirs: list[Path]) -> tuple[int, list[str]]:
    """(how many jobs the sweep in ``root`` asks for, one line per job that never started: no directory, or one
    without .hydra); (0, []) when the expected jobs cannot be known."""
    expected = expected_jobs(root)
    if expected is None:
        return 0, []
    started = {started_overrides(d) for d in run_dirs}
    # a job is named by its number and the overrides that tell it from the others (every job has one per key)
    swept = [i for i in range(len(expected[0][1])) if len({o[i] for _, o in expected}) > 1] if expected else []
    missing = [
        f"{name} ({' '.join(overrides[i] for i in swept)})" if name != " ".join(overrides) else name
        for name, overrides in expected
        if tuple(sorted(overrides)) not in started
    ]
    return len(expected), missing
