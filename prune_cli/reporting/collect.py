"""Reading run directories (never writing them): one row per job (sweep.csv / sweep.md), every setting of a run
from its config, its results, provenance and identity."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pandas as pd
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prune_cli.core.atomic import write_text
from prune_cli.run.lock import lock_owner
from prune_cli.run.resumable import added_option
from prune_cli.run.tables import IDENTITY, deltas, dynamic, flatten, identity, markdown_table, normal, write_csv
from prune_cli.stages.base import dense_and_final


def run_dirs(root: Path) -> list[Path]:
    """Every run below ``root``: a directory with Hydra's .hydra/ or our results.csv / status.json."""
    found = {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    found |= {p.parent for p in root.rglob("results.csv")} | {p.parent for p in root.rglob("status.json")}
    # numbered job directories in numeric order; a name that is no number (a copy "1.bak") after the numbers
    return sorted(
        found, key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.relative_to(root).parts]
    )


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
    status = (
        json.loads(status_file.read_text(encoding="utf-8"))
        if status_file.is_file()
        else {"status": "unknown", "error": ""}
    )
    if status["status"] == "unknown" and not results.is_file():  # Hydra started it; it never recorded how it ran
        status["status"] = "running"  # so it is running (its lock held) or was killed (dead)
    row["status"] = status["status"] if results.is_file() or status["status"] == "failed" else "failed"
    if status.get("error"):
        row["error"] = status["error"]
    if status["status"] == "running" and lock_owner(run_dir) is None:  # no live process holds it: killed
        row["status"], row["error"] = "dead", "the run ended without recording how (killed?)"
    provenance = run_dir / "run.json"
    if provenance.is_file():
        where = json.loads(provenance.read_text(encoding="utf-8"))
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


# a sweep or report with such a job exits non-zero; dead: no process holds the run's lock now, while status.json
# says running or was never written (killed before it recorded anything)
NOT_DONE = ("failed", "unreadable", "interrupted", "dead")


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


def job_rows(root: Path) -> list[dict]:
    """One row per run below ``root`` (failed runs included, with their error); nothing is written."""
    root = Path(root)
    return [job_row(d, root) for d in run_dirs(root)]


def jobs_markdown(rows: list[dict], notes: list[str]) -> str:
    """The jobs table as sweep.md shows it: a row per job, then the jobs that did not finish and ``notes``."""
    columns = [c for c in SWEEP_COLUMNS if any(c in r for r in rows)]
    text = markdown_table(rows, columns) + "\n"
    not_done = [r for r in rows if r["status"] in NOT_DONE]
    if not_done:
        listed = "; ".join(f"{r['job']} ({r['status']}): {r.get('error', 'no results')}" for r in not_done)
        text += f"\nnot done: {listed}\n"
    return text + "".join(f"\n{n}\n" for n in notes)


def write_jobs(out_dir: Path, rows: list[dict], text: str) -> None:
    """sweep.csv (the rows) and sweep.md (``text``) into ``out_dir``."""
    write_csv(Path(out_dir) / "sweep.csv", rows)
    write_text(Path(out_dir) / "sweep.md", text)


def run_identity(run_dir: Path) -> str | None:
    """What one run is, whatever directory holds it: the run_id of its run.json, else (a run written before run_id
    existed) the hash of its results.csv and its checkpoints' names and sizes; None when it has neither."""
    try:
        recorded = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and recorded:
        return f"run_id {recorded}"
    results = run_dir / "results.csv"
    if not results.is_file():
        return None
    digest = hashlib.sha256(results.read_bytes())
    for path in sorted((run_dir / "checkpoints").glob("*.pt")):
        digest.update(f"\0{path.name}\0{path.stat().st_size}".encode())
    return f"content {digest.hexdigest()}"


def number(value) -> float | None:
    """A finite number, or None (missing, NaN, not a number)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


def added_default(name: str):
    """The value a setting added after a run was written had for that run (its declaration's ``absent``, or that of
    the block holding it), else ABSENT."""
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
    """The config a checkpoint file holds, or None when the file cannot be read."""
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


KEY_IDENTITY = tuple(k for k in IDENTITY if k != "seed")  # the key columns every summary shows


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


_hashes: dict[str, str | None] = {}
