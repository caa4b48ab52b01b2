"""Tables over many runs: sweep.csv / sweep.md (one row per job) and sweep_summary.csv / sweep_summary.md (one row
per group of runs that differ only in their seed: n, mean and sample std, min, max, best of n, a dense check).

``prune-cli-report DIR...`` aggregates any directories of runs (sweeps, or runs collected by hand), pivots
(``--by``, ``--columns``), prints md / csv / latex / json and plots (``--plots``, prune_cli/plots.py); Hydra calls
the same aggregation after every ``-m`` sweep (``SweepTable``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import distributed
from .atomic import write_text
from .errors import UserError
from .report import IDENTITY, deltas, dense_and_final, dynamic, fmt, identity, markdown_table, write_csv


def run_dirs(root: Path) -> list[Path]:
    """Every run below ``root``: a directory with Hydra's .hydra/ or our results.csv / status.json."""
    found = {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    found |= {p.parent for p in root.rglob("results.csv")} | {p.parent for p in root.rglob("status.json")}
    return sorted(found, key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts])


def job_row(run_dir: Path, root: Path) -> dict:
    """One run's row: its status and error, identity, final and dense results, and where it ran; a run whose
    files cannot be read is listed as ``unreadable`` with the reason, never dropped."""
    row = {"job": str(run_dir.relative_to(root)) or "."}
    try:
        return read_job(run_dir, row)
    except (OSError, ValueError, KeyError, IndexError, pd.errors.ParserError) as e:
        return {**row, "status": "unreadable", "error": f"{type(e).__name__}: {e}".splitlines()[0]}


def read_job(run_dir: Path, row: dict) -> dict:
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        row["overrides"] = " ".join(OmegaConf.load(overrides))
    status_file, results = run_dir / "status.json", run_dir / "results.csv"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {"status": "unknown", "error": ""}
    row["status"] = status["status"] if results.is_file() or status["status"] == "failed" else "failed"
    if status.get("error"):
        row["error"] = status["error"]
    provenance = run_dir / "run.json"
    if provenance.is_file():
        where = json.loads(provenance.read_text())
        row.update({k: where.get(k) for k in PROVENANCE_COLUMNS})
    if not results.is_file():
        return row
    if results.stat().st_size == 0:
        raise ValueError("results.csv is empty")
    df = pd.read_csv(results)
    rows = df.to_dict("records")
    if not rows:
        raise ValueError("results.csv has no rows")
    row.update({k: rows[-1].get(k) for k in IDENTITY})
    final = rows[-1]
    row.update(
        {
            "final_stage": final["stage"],
            "top1": final["top1"],
            "best_top1": final["best_top1"],
            "params": final["params"],
            "macs": final["macs"],
            **({"dynamic_macs": dynamic(final)} if dynamic(final) is not None else {}),
            "seconds": float(df["seconds"].sum()),
        }
    )
    pair = dense_and_final(rows)
    if pair:
        row["dense_top1"] = pair[0]["top1"]
        row.update(deltas(*pair))
    return row


# where a run ran (from its run.json): shown in sweep tables so runs of different setups are told apart
PROVENANCE_COLUMNS = ("prune_cli", "torch", "device")
NOT_DONE = ("failed", "unreadable", "interrupted")  # a sweep or report with such a job exits non-zero

SWEEP_COLUMNS = [
    "job",
    "status",
    *IDENTITY,
    "dense_top1",
    "top1",
    "top1_change",
    "params",
    "params_removed_%",
    "macs",
    "macs_removed_%",
    "dynamic_macs",
    "seconds",
    *PROVENANCE_COLUMNS,
]


def job_table(root: Path) -> list[dict]:
    """One row per run below ``root`` (failed runs included, with their error), written to sweep.csv / sweep.md."""
    root = Path(root)
    rows = [job_row(d, root) for d in run_dirs(root)]
    write_csv(root / "sweep.csv", rows)
    columns = [c for c in SWEEP_COLUMNS if any(c in r for r in rows)]
    text = markdown_table(rows, columns) + "\n"
    not_done = [r for r in rows if r["status"] in NOT_DONE]
    if not_done:
        listed = "; ".join(f"{r['job']} ({r['status']}): {r.get('error', 'no results')}" for r in not_done)
        text += f"\nnot done: {listed}\n"
    write_text(root / "sweep.md", text)
    return rows


def aggregate(root: Path) -> list[dict]:
    """Write sweep.csv / sweep.md (one row per job) and sweep_summary.csv / sweep_summary.md (one row per group of
    runs that differ only in their seed) into ``root``; returns the job rows."""
    root = Path(root)
    jobs, summary = collect([root])
    write_summary(root, summary)
    return [row for _, row in jobs]


# ---------------------------------------------------------------------------------------------------------------
# Groups of runs that differ only in their seed: sweep_summary.csv / sweep_summary.md, pivots, the sweep's plots.
#
# Every setting of a run is read from Hydra's .hydra/config.yaml (written for every job of the command line, one
# that failed included), else from the config its newest checkpoint holds (runs written by pipeline.run without
# Hydra), else (no config at all) from the identity columns of its results.csv. Runs fall in one group when all
# their settings are equal except the seed and the few below that do not change what a run computes.

SUMMARY_CSV, SUMMARY_MD = "sweep_summary.csv", "sweep_summary.md"
KEY_IDENTITY = tuple(k for k in IDENTITY if k != "seed")  # the key columns every summary shows
# settings that never separate groups (besides rundir.RESUMABLE_DIFFERENCES: device, threads, progress, ...): the
# seed (what a group averages over), where the dense model came from (init_from: checked by the dense check
# instead) and where the data files live
NOT_GROUPED = ("seed", "init_from", "dataset.root", "dataset.download", "dataset.check_md5")
# a run without a config: its identity columns, under the config path each one shows
IDENTITY_PATHS = {
    "model": "model.name",
    "dataset": "dataset.name",
    "regularizer": "regularizer.name",
    "criterion": "criterion.name",
    "target": "prune.target",
    "ratio": "prune.ratio",
}
ABSENT = "(absent)"  # a setting a run's config does not have (and that is no known later addition)
SPEEDUP_COLUMNS = ("speedup_b1", "speedup_bN")  # measured speed-ups, averaged when the runs have them
# what a pivot's cells may show: {value: its label}
VALUES = {
    "top1": "final top-1 (%)",
    "top1_change": "top-1 change (points)",
    "dense_top1": "dense top-1 (%)",
    "params_removed_%": "params removed (%)",
    "macs_removed_%": "MACs removed (%)",
}
AMOUNT_KEYS = ("ratio", "prune.ratio", "prune.layer_ratios")  # how much is pruned: the points along a plot's line
FORMATS = ("md", "csv", "latex", "json")


@dataclass
class Summary:
    keys: list[str]  # the key columns: identity (but the seed), then the settings that tell the groups apart
    varying: list[str]  # the key columns whose values differ between groups
    names: list[str]  # every setting that groups runs (valid --by / --columns keys, with the identity columns)
    groups: list[dict] = field(default_factory=list)  # {"row": the table's row, "label": every key, "stats": ...}
    notes: list[str] = field(default_factory=list)  # dense checks that failed, one line each
    not_done: list[str] = field(default_factory=list)  # one line per job that did not finish
    jobs: int = 0

    @property
    def rows(self) -> list[dict]:
        return [g["row"] for g in self.groups]


def collect(roots: list[Path]) -> tuple[list[tuple[Path, dict]], Summary]:
    """Every job below ``roots`` as (its directory, its sweep row; sweep.csv / sweep.md written into each root),
    and their groups. With several roots a job is named by its path."""
    jobs = []
    for root in roots:
        for row in job_table(root):
            path = root / row["job"]
            jobs.append((path, row if len(roots) == 1 else {**row, "job": str(path)}))
    return jobs, summarize(jobs)


def number(value) -> float | None:
    """A finite number, or None (missing, NaN, not a number)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


def normal(value):
    """A setting's value as a hashable scalar: lists and mappings as JSON text, NaN as None."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = normal(value)
    return out


def grouped(name: str) -> bool:
    """Whether a setting separates groups (not the seed, nor one that does not change what a run computes)."""
    from .rundir import RESUMABLE_DIFFERENCES  # imported here: rundir imports this module

    return not any(name == k or name.startswith(f"{k}.") for k in (*NOT_GROUPED, *RESUMABLE_DIFFERENCES))


def added_default(name: str):
    """The value a setting added after a run was written had for that run (rundir.ADDED_OPTIONS), else ABSENT."""
    from .rundir import added_option

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        value = added_option(".".join(parts[:i]))
        if value is not None:
            for part in parts[i:]:
                if not isinstance(value, dict) or part not in value:
                    return ABSENT
                value = value[part]
            return normal(value)
    return ABSENT


def run_config(run_dir: Path) -> tuple[dict | None, set[str]]:
    """(the run's config as a plain dict, the keys its command overrode): Hydra's .hydra/config.yaml, else the
    config its newest checkpoint holds; (None, set()) when neither can be read."""
    hydra_dir = run_dir / ".hydra"
    config, overridden = None, set()
    try:
        if (hydra_dir / "config.yaml").is_file():
            loaded = OmegaConf.load(hydra_dir / "config.yaml")
            try:
                config = OmegaConf.to_container(loaded, resolve=True)
            except OmegaConfBaseException:  # e.g. an environment variable this process lacks
                config = OmegaConf.to_container(loaded, resolve=False)
        if (hydra_dir / "overrides.yaml").is_file():
            for override in OmegaConf.load(hydra_dir / "overrides.yaml"):
                overridden.add(str(override).split("=", 1)[0].lstrip("+~"))
    except (OSError, ValueError, OmegaConfBaseException, yaml.YAMLError):
        config = None
    if not isinstance(config, dict):
        config = None
        checkpoints = sorted((run_dir / "checkpoints").glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in checkpoints:
            config = checkpoint_config(path)
            if config is not None:
                break
    return config, overridden


def checkpoint_config(path: Path) -> dict | None:
    import torch

    for mmap in (True, False):  # mapped: the weights are not read (legacy, non-zip files cannot be mapped)
        try:
            config = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap).get("config")
            return config if isinstance(config, dict) else None
        except Exception:  # any unreadable file: the next source is tried
            continue
    return None


def result_details(run_dir: Path) -> dict:
    """From a finished run's results.csv: its dense row's (top-1, params, MACs) and its measured speed-ups."""
    try:
        rows = pd.read_csv(run_dir / "results.csv").to_dict("records")
    except (OSError, ValueError, pd.errors.ParserError):
        return {}
    out = {}
    pair = dense_and_final(rows) if rows else None
    if pair:
        out["dense"] = tuple(number(pair[0].get(k)) for k in ("top1", "params", "macs"))
    for column in SPEEDUP_COLUMNS:
        value = next((number(r.get(column)) for r in reversed(rows) if number(r.get(column)) is not None), None)
        if value is not None:
            out[column] = value
    return out


def job_record(run_dir: Path, row: dict) -> dict:
    config, overridden = run_config(run_dir)
    ident = {k: normal(row[k]) for k in KEY_IDENTITY if k in row}
    if not ident and config is not None:
        try:
            ident = {k: normal(v) for k, v in identity(OmegaConf.create(config)).items() if k != "seed"}
        except Exception:  # a config that does not even name its parts: shown by its settings alone
            ident = {}
    settings = flatten(config) if config is not None else {IDENTITY_PATHS[k]: v for k, v in ident.items()}
    seed = row.get("seed") if number(row.get("seed")) is not None else (config or {}).get("seed")
    done = row.get("status") == "done" and number(row.get("top1")) is not None
    return {
        "row": row,
        "ident": {k: ident.get(k, "?") for k in KEY_IDENTITY},
        "settings": settings,
        "overridden": overridden,
        "seed": int(seed) if number(seed) is not None else None,
        "init_from": (config or {}).get("init_from"),
        "done": done,
        **(result_details(run_dir) if done else {}),
    }


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


_hashes: dict[str, str | None] = {}


def checkpoint_source(init_from) -> tuple[str, str]:
    """(key, name) of what a run's dense model came from: trained in the run, or its init_from checkpoint, keyed
    by the sha256 of the file where it is readable now (copies of one checkpoint are one source) and by its path
    otherwise."""
    if init_from is None:
        return "trained", "trained in the run"
    path = str(Path(str(init_from)).expanduser())
    if path not in _hashes:
        try:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            _hashes[path] = digest.hexdigest()
        except OSError:
            _hashes[path] = None
    digest = _hashes[path]
    if digest is None:
        return f"path {init_from}", str(init_from)
    return f"sha256 {digest}", f"{init_from} (sha256 {digest[:12]})"


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


def pm(mean, std, signed: bool = False) -> str:
    if mean is None:
        return "-"
    return (f"{mean:+.2f}" if signed else f"{mean:.2f}") + f" ± {fmt(std)}"


SUMMARY_TEXT = (
    "top-1: test set (%), at the last epoch of the final stage (dense: the row before pruning); mean ± sample std "
    '(n - 1) over the group\'s n finished runs, std "-" for n = 1; min, max: the lowest and highest final top-1; '
    "best of n: the highest, an optimistic figure (compare means), with its seed; removed: mean share of the dense "
    "model's params (every parameter) and MACs (conv + linear multiply-accumulates, one image)."
)


def summary_cells(summary: Summary) -> tuple[list[str], list[dict]]:
    """The summary's table as text cells: (columns, rows)."""
    speedups = [c for c in SPEEDUP_COLUMNS if any(f"{c}_mean" in r for r in summary.rows)]
    columns = [
        *summary.keys,
        "n",
        "dense top-1",
        "final top-1",
        "change",
        "min",
        "max",
        "best of n (seed)",
        "params removed (%)",
        "MACs removed (%)",
        *[f"{c} (mean)" for c in speedups],
        "not done",
        "dense check",
    ]
    rows = []
    for r in summary.rows:
        best = "-"
        if r["best_of_n_top1"] is not None:
            best = f"{fmt(r['best_of_n_top1'])} (seed {key_text(r['best_of_n_seed'])})"
        rows.append(
            {
                **{k: key_text(r[k]) for k in summary.keys},
                "n": str(r["n"]),
                "dense top-1": pm(r["dense_top1_mean"], r["dense_top1_std"]),
                "final top-1": pm(r["top1_mean"], r["top1_std"]),
                "change": pm(r["top1_change_mean"], r["top1_change_std"], signed=True),
                "min": fmt(r["top1_min"]),
                "max": fmt(r["top1_max"]),
                "best of n (seed)": best,
                "params removed (%)": fmt(r["params_removed_%_mean"]),
                "MACs removed (%)": fmt(r["macs_removed_%_mean"]),
                **{f"{c} (mean)": fmt(r.get(f"{c}_mean")) for c in speedups},
                "not done": str(r["not_done"]),
                "dense check": r["dense_check"],
            }
        )
    return columns, rows


def summary_notes(summary: Summary) -> list[str]:
    notes = [SUMMARY_TEXT]
    notes += [f"dense check: {n}" for n in summary.notes]
    if summary.not_done:
        notes.append(f"not done ({len(summary.not_done)} of {summary.jobs} jobs): {'; '.join(summary.not_done)}")
    return notes


def summary_title(summary: Summary) -> str:
    return f"runs grouped by every setting but the seed: {len(summary.groups)} group(s) of {summary.jobs} job(s)"


def write_summary(root: Path, summary: Summary) -> None:
    """sweep_summary.csv (numbers in full) and sweep_summary.md (the printed table) into ``root``."""
    write_csv(root / SUMMARY_CSV, summary.rows)
    columns, cells = summary_cells(summary)
    text = render("md", summary_title(summary), columns, cells, summary.rows, summary_notes(summary))
    write_text(root / SUMMARY_MD, text)


def pivot(summary: Summary, by: list[str], columns: list[str], value: str) -> tuple[str, list[str], list, list]:
    """(title, columns, text rows, raw rows) of ``value`` with ``by`` as rows and ``columns`` as columns. The rows
    also carry every other key that differs between groups, so that no two groups share a cell."""
    row_keys = [*by, *[k for k in summary.varying if k not in by and k not in columns]]
    order = sorted(summary.groups, key=lambda g: [sort_key(g["label"][k]) for k in [*row_keys, *columns]])
    col_values = list(dict.fromkeys(tuple(g["label"][k] for k in columns) for g in order))
    col_values.sort(key=lambda t: [sort_key(v) for v in t])
    names = [", ".join(f"{k}={key_text(v)}" for k, v in zip(columns, t)) or VALUES[value] for t in col_values]
    table: dict[tuple, dict] = {}
    for g in order:
        cells = table.setdefault(tuple(g["label"][k] for k in row_keys), {})
        cells[tuple(g["label"][k] for k in columns)] = g["stats"][value]
    text_rows, raw_rows = [], []
    for rkey, cells in table.items():
        text = {k: key_text(v) for k, v in zip(row_keys, rkey)}
        raw = dict(zip(row_keys, rkey))
        for t, name in zip(col_values, names):
            mean, std, n = cells.get(t, (None, None, 0))
            text[name] = "-" if mean is None else f"{pm(mean, std, signed=value == 'top1_change')} ({n})"
            raw.update({f"{name} mean": mean, f"{name} std": std, f"{name} n": n})
        text_rows.append(text)
        raw_rows.append(raw)
    rows = ", ".join(row_keys) or "-"
    title = f"{VALUES[value]}: mean ± sample std (n); rows: {rows}; columns: {', '.join(columns)}"
    return title, [*row_keys, *names], text_rows, raw_rows


def sort_key(value) -> tuple:
    return (0, value, "") if number(value) is not None else (1, 0, str(value))


def render(form: str, title: str, columns: list[str], cells: list[dict], raw: list[dict], notes: list[str]) -> str:
    """One table as md, csv (raw numbers), latex (booktabs tabular) or json (raw numbers and the notes)."""
    if form == "csv":
        buf = io.StringIO()
        pd.DataFrame(raw).to_csv(buf, index=False)
        return buf.getvalue()
    if form == "json":
        clean = [{k: number(v) if isinstance(v, float) else v for k, v in r.items()} for r in raw]
        return json.dumps({"title": title, "rows": clean, "notes": notes}, indent=2, default=str) + "\n"
    if form == "latex":
        lines = [
            f"% {title}",
            "\\begin{tabular}{" + "l" * len(columns) + "}",
            "\\toprule",
            " & ".join(latex(c) for c in columns) + " \\\\",
            "\\midrule",
            *[" & ".join(latex(r.get(c, "")) for c in columns) + " \\\\" for r in cells],
            "\\bottomrule",
            "\\end{tabular}",
            *[f"% {n}" for n in notes],
        ]
        return "\n".join(lines) + "\n"
    text = f"## {title}\n\n{markdown_table(cells, columns)}\n"
    return text + "".join(f"\n{n}\n" for n in notes)


def latex(text: str) -> str:
    out = "".join("\\" + ch if ch in "&%$#_{}" else "\\textbackslash{}" if ch == "\\" else ch for ch in str(text))
    return out.replace("~", "\\textasciitilde{}").replace("^", "\\textasciicircum{}").replace("±", "$\\pm$")


def plot_series(summary: Summary) -> list[dict]:
    """The sweep plots' lines: one per method (the key columns that differ, but the amount pruned), a point per
    amount with the mean final top-1, its sample std and the mean params / MACs removed."""
    methods = [k for k in summary.varying if not k.startswith(AMOUNT_KEYS)]
    lines: dict[tuple, dict] = {}
    for g in summary.groups:
        row, stats = g["row"], g["stats"]
        if row["n"] == 0 or row["macs_removed_%_mean"] is None or row["top1_mean"] is None:
            continue
        key = tuple(g["label"][k] for k in methods)
        name = ", ".join(f"{k}={key_text(v)}" for k, v in zip(methods, key)) or f"criterion={g['label']['criterion']}"
        line = lines.setdefault(key, {"method": name, "points": [], "dense": []})
        line["points"].append(
            {
                "macs": row["macs_removed_%_mean"],
                "params": row["params_removed_%_mean"],
                "top1": row["top1_mean"],
                "std": row["top1_std"],
                "n": row["n"],
            }
        )
        if stats["dense_top1"][0] is not None:
            line["dense"].append(stats["dense_top1"][0])
    for line in lines.values():
        line["dense"] = statistics.fmean(line["dense"]) if line["dense"] else None
    return list(lines.values())


def sweep_plots(summary: Summary, out_dir: Path) -> list[Path]:
    """top1_vs_macs / top1_vs_params (.png and .svg) into ``out_dir``; plots.Unavailable without matplotlib."""
    from . import plots

    return plots.sweep_plots(plot_series(summary), Path(out_dir))


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


class ReportParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other failure of the command
        required = "the following arguments are required: "
        if message.startswith(required):
            message = f"argument {message.removeprefix(required)}: required (prune-cli-report --help)"
        what, _, why = message.removeprefix("argument ").partition(": ")
        print(f"error: {what}: {why}" if why else f"error: arguments: {message}", file=sys.stderr)
        sys.exit(2)


def keys_of(text: str | None) -> list[str]:
    return [k.strip() for k in (text or "").split(",") if k.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = ReportParser(
        prog="prune-cli-report",
        description="Aggregate directories of runs: one row per job (sweep.csv / sweep.md) and one per group of runs "
        "that differ only in their seed (sweep_summary.csv / sweep_summary.md), optionally pivoted and plotted.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="directories of runs, e.g. sweep directories")
    parser.add_argument("--by", metavar="KEY[,KEY]", help="row keys of the table (a pivot with --columns)")
    parser.add_argument("--columns", metavar="KEY[,KEY]", help="pivot: these keys' values become the columns")
    parser.add_argument("--value", choices=list(VALUES), default="top1", help="what a pivot's cells show (top1)")
    parser.add_argument("--format", choices=FORMATS, default="md", help="how the table is printed (md)")
    parser.add_argument("--plots", action="store_true", help="write the sweep plots and each run's plots")
    parser.add_argument("--output", type=Path, metavar="DIR", help="where the summary and sweep plots go (the DIR)")
    args = parser.parse_args(argv)
    try:
        return report(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or 'output'}: {e.strerror or type(e).__name__}", file=sys.stderr)
        return 2


def report(args) -> int:
    for d in args.dirs:
        if not d.is_dir():
            raise UserError("dir", f"{d} is not a directory")
    by, columns = keys_of(args.by), keys_of(args.columns)
    out = args.output if args.output is not None else args.dirs[0] if len(args.dirs) == 1 else None
    if args.plots:
        from . import plots

        if out is None:
            raise UserError("--output", "--plots over several directories needs a directory for the sweep plots")
        try:
            plots.require()
        except plots.Unavailable as e:
            raise UserError("--plots", str(e)) from None
    jobs, summary = collect(args.dirs)
    if not jobs:
        raise UserError("dir", f"no runs found below {' '.join(map(str, args.dirs))}")
    for option, keys in (("--by", by), ("--columns", columns)):
        for k in keys:
            if k == "seed":
                raise UserError(option, "seed is what a group averages over, not a key of the table")
            if k not in summary.names:
                differ = ", ".join(summary.varying) or "nothing but the seed"
                raise UserError(option, f"no setting {k} groups these runs (they differ in: {differ})")
    if set(by) & set(columns):
        raise UserError("--columns", f"{', '.join(sorted(set(by) & set(columns)))} is already a row key (--by)")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_summary(out, summary)
    if columns:
        title, names, cells, raw = pivot(summary, by, columns, args.value)
        text = render(args.format, title, names, cells, raw, summary_notes(summary)[1:])
    else:
        if by:  # the key columns reordered: these first, then the others; groups sorted by them
            summary.keys = [*by, *[k for k in summary.keys if k not in by]]
            summary.groups.sort(key=lambda g: [sort_key(g["label"][k]) for k in by])
            for g in summary.groups:
                g["row"] = {**{k: g["label"][k] for k in summary.keys}, **g["row"]}
        names, cells = summary_cells(summary)
        text = render(args.format, summary_title(summary), names, cells, summary.rows, summary_notes(summary))
        if args.format == "md" and not by:  # the jobs first, as after a sweep
            text = "".join((d / "sweep.md").read_text() + "\n" for d in args.dirs) + text
    print(text, end="")
    status = 1 if any(row["status"] in NOT_DONE for _, row in jobs) else 0
    if args.plots:
        status = max(status, write_plots(summary, out, [path for path, _ in jobs]))
    return status


def write_plots(summary: Summary, out: Path, run_paths: list[Path]) -> int:
    """The sweep plots into ``out`` and each run's plots into its directory; one line to stderr saying where, one
    line per file that could not be plotted. Returns the exit status (1 if any could not)."""
    from . import plots

    status, written = 0, []
    try:
        written += sweep_plots(summary, out)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: plots: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        status = 1
    for path in run_paths:
        try:
            written += plots.run_plots(path)
        except (OSError, ValueError, KeyError, pd.errors.ParserError) as e:
            print(f"error: {path}: cannot plot ({type(e).__name__}: {e})".splitlines()[0], file=sys.stderr)
            status = 1
    print(f"plots: wrote {len(written)} files ({', '.join(sorted({p.name for p in written}))})", file=sys.stderr)
    return status
