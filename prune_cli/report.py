"""Tables: results.csv / summary.md of one run, and sweep.csv / sweep.md over many runs.

``prune-cli-report DIR`` aggregates any directory of runs (a sweep, or runs
collected by hand); Hydra calls the same aggregation after every ``-m`` sweep.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from .atomic import write_text
from .stages import STAGES, pruning_stages  # the stage registry says which stages prune and re-form

IDENTITY = ("model", "dataset", "regularizer", "criterion", "target", "ratio", "seed")


def identity(cfg) -> dict:
    """The run's identifying choices, repeated on every row so tables from many runs can be stacked.

    A group no listed stage reads (``Stage.reads``) shows "-" (the regularizer: "none"): a table never names a
    criterion or a regularizer that did not act."""
    reads = {group for name in cfg.schedule.stages if name in STAGES for group in STAGES.get(name).reads}
    return {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "regularizer": cfg.regularizer.name if "regularizer" in reads else "none",
        "criterion": cfg.criterion.name if "criterion" in reads else "-",
        "target": cfg.prune.target if "prune" in reads else "-",
        "ratio": cfg.prune.ratio if "prune" in reads else "-",
        "seed": cfg.seed,
    }


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    write_text(path, buf.getvalue())


def write_status(run_dir: Path, status: str, error: str = "") -> None:
    write_text(Path(run_dir) / "status.json", json.dumps({"status": status, "error": error}) + "\n")


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


DIGITS = {"params (M)": 4, "MACs (M)": 2}  # columns that need other than 2 decimals


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c), DIGITS.get(c, 2)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def dense_and_final(rows: list[dict]) -> tuple[dict, dict] | None:
    """The dense model and the final one; None if nothing was pruned. The dense model is the row before pruning,
    or before the first stage that re-formed the network on the way (``Stage.reforms``, e.g. RMNet's rm): what
    the method started from."""
    pruning = pruning_stages()
    i = next((i for i, r in enumerate(rows) if r["stage"] in pruning), None)
    if i is None:
        return None
    reforming = {name for name, stage in STAGES.items() if stage.reforms}
    i = next((j for j in range(i) if rows[j]["stage"] in reforming), i)
    return rows[max(i - 1, 0)], rows[-1]


def deltas(dense: dict, final: dict) -> dict:
    return {
        "params_removed_%": 100 * (1 - final["params"] / dense["params"]),
        "macs_removed_%": 100 * (1 - final["macs"] / dense["macs"]),
        "top1_change": final["top1"] - dense["top1"],
    }


def dynamic(row: dict) -> float | None:
    """A row's ``dynamic_macs`` (the test-set mean of an input-dependent network's MACs), None where it has none."""
    value = row.get("dynamic_macs")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def summary_markdown(rows: list[dict], ident: dict) -> str:
    title = ", ".join(f"{k}={v}" for k, v in ident.items())
    shown = [{**r, "params (M)": r["params"] / 1e6, "MACs (M)": r["macs"] / 1e6} for r in rows]
    macs = ["MACs (M)"]
    if any(dynamic(r) is not None for r in rows):  # input-dependent networks (channel gating): only on their rows
        macs.append("dynamic MACs (M)")
        shown = [{**r, "dynamic MACs (M)": None if dynamic(r) is None else dynamic(r) / 1e6} for r in shown]
    table = markdown_table(shown, ["stage", "top1", "best_top1", "loss", "params (M)", *macs, "epochs", "seconds"])
    text = f"## {title}\n\n{table}\n"
    final = rows[-1] if rows else {}
    if dynamic(final) is not None:
        text += (
            f"\nstatic -> dynamic (mean over the test images): MACs {final['macs'] / 1e6:.2f}M -> "
            f"{dynamic(final) / 1e6:.2f}M ({100 * (1 - dynamic(final) / final['macs']):.2f}% fewer), "
            f"top-1 {fmt(final['top1'])}\n"
        )
    pair = dense_and_final(rows)
    if pair:
        d = deltas(*pair)
        dense, final = pair
        text += (
            f"\ndense -> pruned: params {dense['params'] / 1e6:.4f}M -> {final['params'] / 1e6:.4f}M "
            f"({d['params_removed_%']:.2f}% removed), MACs {dense['macs'] / 1e6:.2f}M -> {final['macs'] / 1e6:.2f}M "
            f"({d['macs_removed_%']:.2f}% removed), top-1 {fmt(dense['top1'])} -> {fmt(final['top1'])} "
            f"({d['top1_change']:+.2f})\n"
        )
    return text


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


def aggregate(root: Path) -> list[dict]:
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


class SweepTable(Callback):
    """After a multirun, aggregate its jobs; exit non-zero if any of them did not finish."""

    def on_multirun_end(self, config, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        if not root.is_dir():
            return
        rows = aggregate(root)
        print((root / "sweep.md").read_text())
        if any(r["status"] in NOT_DONE for r in rows):
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prune-cli-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a directory of runs, e.g. a multirun sweep directory")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"error: dir: {args.dir} is not a directory", file=sys.stderr)
        return 2
    rows = aggregate(args.dir)
    if not rows:
        print(f"error: dir: no runs found below {args.dir}", file=sys.stderr)
        return 2
    print((args.dir / "sweep.md").read_text(), end="")
    return 1 if any(r["status"] in NOT_DONE for r in rows) else 0
