"""Groups of runs that differ only in their seed: n, mean and sample std, min, max, best of n, and a dense check.

Every setting of a run is read from Hydra's .hydra/config.yaml (written for every job of the command line, one
that failed included), else from the config its newest checkpoint holds (runs written by pipeline.run without
Hydra), else (no config at all) from the identity columns of its results.csv. Runs fall in one group when all
their settings are equal except the seed and the few that do not change what a run computes (``NOT_GROUPED``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from prune_cli.reporting.collect import (
    KEY_IDENTITY,
    SPEEDUP_COLUMNS,
    added_default,
    checkpoint_source,
    job_record,
    job_rows,
    number,
    run_identity,
)
from prune_cli.reporting.expected import missing_jobs
from prune_cli.run.resumable import RESUMABLE_DIFFERENCES
from prune_cli.run.tables import fmt

# ---------------------------------------------------------------------------------------------------------------
# Groups of runs that differ only in their seed: sweep_summary.csv / sweep_summary.md, pivots, the sweep's plots.
#
# Every setting of a run is read from Hydra's .hydra/config.yaml (written for every job of the command line, one
# that failed included), else from the config its newest checkpoint holds (runs written by pipeline.run without
# Hydra), else (no config at all) from the identity columns of its results.csv. Runs fall in one group when all
# their settings are equal except the seed and the few below that do not change what a run computes.

# settings that never separate groups (besides rundir.RESUMABLE_DIFFERENCES: device, threads, progress, ...): the
# seed (what a group averages over), where the dense model came from (init_from: checked by the dense check
# instead) and where the data files live
NOT_GROUPED = ("seed", "init_from", "dataset.root", "dataset.download", "dataset.check_md5")
# what a pivot's cells may show: {value: its label}
VALUES = {
    "top1": "final top-1 (%)",
    "top1_change": "top-1 change (points)",
    "dense_top1": "dense top-1 (%)",
    "params_removed_%": "params removed (%)",
    "macs_removed_%": "MACs removed (%)",
}
AMOUNT_KEYS = ("ratio", "prune.ratio", "prune.layer_ratios")  # how much is pruned: the points along a plot's line


@dataclass
class Summary:
    keys: list[str]  # the key columns: identity (but the seed), then the settings that tell the groups apart
    varying: list[str]  # the key columns whose values differ between groups
    names: list[str]  # every setting that groups runs (valid --by / --columns keys, with the identity columns)
    groups: list[dict] = field(default_factory=list)  # {"row": the table's row, "label": every key, "stats": ...}
    notes: list[str] = field(default_factory=list)  # dense checks that failed, one line each
    not_done: list[str] = field(default_factory=list)  # one line per job that did not finish
    jobs: int = 0
    copies: list[str] = field(default_factory=list)  # "A = B": directories that hold one run, counted once
    missing: list[str] = field(default_factory=list)  # one line per sweep job that never started
    expected: int = 0  # how many jobs the sweeps asked for (0: not known, e.g. runs collected by hand)

    @property
    def rows(self) -> list[dict]:
        return [g["row"] for g in self.groups]


def collect(roots: list[Path]) -> tuple[list[tuple[Path, dict]], Summary]:
    """Every job below ``roots`` as (its directory, its sweep row), copies of one run counted once, and their
    groups, with the sweeps' jobs that never started. With several roots a job is named by its path. Nothing is
    written."""
    jobs, missing, expected = [], [], 0
    for root in roots:
        rows = job_rows(root)
        for row in rows:
            path = root / row["job"]
            jobs.append((path, row if len(roots) == 1 else {**row, "job": str(path)}))
        asked, never = missing_jobs(root, [root / row["job"] for row in rows])
        expected += asked
        missing += never if len(roots) == 1 else [f"{root / m}" for m in never]
    jobs, copies = drop_copies(jobs)
    summary = summarize(jobs)
    summary.copies, summary.missing, summary.expected = copies, missing, expected
    return jobs, summary


def drop_copies(jobs: list[tuple[Path, dict]]) -> tuple[list[tuple[Path, dict]], list[str]]:
    """The jobs with each run once (copies share a run_id, or, written before run_id, their results), and one
    "A = B" per run held by several directories. The copy kept is a finished one if any, else the first."""
    same: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(jobs):
        identity = run_identity(path)
        same.setdefault(identity if identity is not None else f"path {i}", []).append(i)
    dropped, copies = set(), []
    for indices in same.values():
        if len(indices) > 1:
            kept = next((i for i in indices if jobs[i][1].get("status") == "done"), indices[0])
            dropped |= set(indices) - {kept}
            copies.append(" = ".join(str(jobs[i][1]["job"]) for i in [kept, *(i for i in indices if i != kept)]))
    return [job for i, job in enumerate(jobs) if i not in dropped], copies


def grouped(name: str) -> bool:
    """Whether a setting separates groups (not the seed, nor one that does not change what a run computes)."""

    return not any(name == k or name.startswith(f"{k}.") for k in (*NOT_GROUPED, *RESUMABLE_DIFFERENCES))


def determined(name: str, columns: list[str], labels: list[dict]) -> bool:
    """Whether the groups' values of ``name`` follow from their values in ``columns``."""
    seen = {}
    for label in labels:
        if seen.setdefault(tuple(label[c] for c in columns), label[name]) != label[name]:
            return False
    return True


def summarize(jobs: list[tuple[Path, dict]]) -> Summary:
    """Group the jobs by every setting but the seed (and NOT_GROUPED); statistics per group, failed jobs counted."""
    records = [job_record(path, row) for path, row in jobs]
    names = sorted({k for r in records for k in r["settings"] if grouped(k)})
    members: dict[tuple, list[dict]] = {}
    for r in records:
        members.setdefault(tuple(r["settings"].get(k, added_default(k)) for k in names), []).append(r)
    labels = []
    for key, group in members.items():
        shown = next((r for r in group if r["done"]), group[0])
        labels.append({**dict(zip(names, key)), **shown["ident"]})
    # key columns: the identity, then each setting that differs between groups unless the columns already shown
    # determine it (a criterion's own options follow from the criterion); the command's overrides come first
    keys = list(KEY_IDENTITY)
    overridden = set().union(*(r["overridden"] for r in records)) if records else set()
    candidates = [k for k in names if len({label[k] for label in labels}) > 1]
    for name in sorted(candidates, key=lambda k: (k not in overridden, k)):
        if name not in keys and not determined(name, keys, labels):
            keys.append(name)
    varying = [k for k in keys if len({label[k] for label in labels}) > 1]
    summary = Summary(keys=keys, varying=varying, names=sorted({*KEY_IDENTITY, *names}), jobs=len(records))
    for label, group in zip(labels, members.values()):
        summary.groups.append(group_summary(keys, varying, label, group, summary.notes))
    summary.not_done = [
        f"{r['row']['job']} ({r['row'].get('status', '?')}): "
        + (r["row"].get("error") or ("not finished" if number(r["row"].get("top1")) is not None else "no results"))
        for r in records
        if not r["done"]
    ]
    return summary


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for fewer than two values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def group_summary(keys: list[str], varying: list[str], label: dict, group: list[dict], notes: list[str]) -> dict:
    done = [r for r in group if r["done"]]

    def values(name: str) -> list[float]:
        return [v for v in (number(r["row"].get(name)) for r in done) if v is not None]

    stats = {name: (*mean_std(values(name)), len(values(name))) for name in VALUES}
    row = {k: label[k] for k in keys}
    row["n"] = len(done)
    for name in ("dense_top1", "top1", "top1_change"):
        row[f"{name}_mean"], row[f"{name}_std"] = stats[name][:2]
    top1 = values("top1")
    best = max(done, key=lambda r: number(r["row"]["top1"])) if done else None
    row.update(
        {
            "top1_min": min(top1) if top1 else None,
            "top1_max": max(top1) if top1 else None,
            "best_of_n_top1": number(best["row"]["top1"]) if best else None,
            "best_of_n_seed": best["seed"] if best else None,
            "best_of_n_job": best["row"]["job"] if best else None,
            "params_removed_%_mean": stats["params_removed_%"][0],
            "macs_removed_%_mean": stats["macs_removed_%"][0],
        }
    )
    for column in SPEEDUP_COLUMNS:
        speedups = [r[column] for r in done if column in r]
        if speedups:
            row[f"{column}_mean"] = statistics.fmean(speedups)
    problems = dense_problems(done)
    row["dense_check"] = "-" if not any("dense" in r for r in done) else "differ" if problems else "ok"
    row["not_done"] = len(group) - len(done)
    row["jobs"] = " ".join(str(r["row"]["job"]) for r in done)
    row["not_done_jobs"] = " ".join(str(r["row"]["job"]) for r in group if not r["done"])
    where = ", ".join(f"{k}={key_text(label[k])}" for k in varying) or "of all runs"
    notes += [f"dense models differ in the group {where}: {p}" for p in problems]
    return {"row": row, "label": label, "stats": stats}


def dense_problems(done: list[dict]) -> list[str]:
    """Why the finished runs of one group did not start from the dense models they should have: (1) they started
    from different dense models (init_from files of different content, or some from a checkpoint and some trained
    in the run); (2) runs that should share one dense model (the same checkpoint; or, training their own, the same
    seed) have different dense rows (top-1, params or MACs)."""
    runs = [r for r in done if r.get("dense") is not None]
    sources: dict[str, list[dict]] = {}
    for r in runs:
        sources.setdefault(checkpoint_source(r["init_from"])[0], []).append(r)
    problems = []
    if len(sources) > 1:
        listed = "; ".join(
            ", ".join(dict.fromkeys(checkpoint_source(r["init_from"])[1] for r in rs))
            + f": job {' '.join(str(r['row']['job']) for r in rs)}"
            for rs in sources.values()
        )
        problems.append(f"started from different dense models ({listed})")
    for rs in sources.values():
        shared: dict[object, list[dict]] = {}
        for r in rs:  # one dense model per checkpoint, or per seed when the runs train their own
            shared.setdefault(None if r["init_from"] is not None else r["seed"], []).append(r)
        for seed, same in shared.items():
            if len({r["dense"] for r in same}) > 1:
                what = "the same checkpoint" if seed is None else f"seed {seed}"
                rows = ", ".join(f"job {r['row']['job']} {fmt(r['dense'][0])}" for r in same)
                problems.append(f"{what} but different dense rows (dense top-1: {rows})")
    return problems


def key_text(value) -> str:
    """A key column's value as written in tables (numbers in full: a learning rate is not rounded)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
