"""The tables of one run: the identity its rows repeat, its config as flat settings, results.csv / metrics.csv
writing, status.json, and summary.md (the table and the dense -> pruned line). Tables over many runs:
``prune_cli.reporting``."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd

from prune_cli.core.atomic import write_text
from prune_cli.stages import STAGES
from prune_cli.stages.base import dense_and_final  # the stage registry says which stages prune and re-form

IDENTITY = ("model", "dataset", "regularizer", "criterion", "target", "ratio", "seed")
TIMING_PREFIXES = (
    "latency_",
    "speedup_",
)  # measured latency (engine.latency): differs between identical runs


def timing_column(column: str) -> bool:
    """Whether a results column is measured time: wall-clock ``seconds`` and ``*_seconds``, and the latency
    columns (``latency_*``, ``speedup_*``). Identical runs differ in them, so every comparison of tables for
    equality (resume, golden files) leaves them out."""
    return column == "seconds" or column.endswith("_seconds") or column.startswith(TIMING_PREFIXES)


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


def normal(value):
    """A setting's value as a hashable scalar: lists and mappings as JSON text, NaN as None."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def flatten(config: dict, prefix: str = "") -> dict:
    """A (plain) config as settings: dotted keys of every nested option, values as ``normal`` gives them."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = normal(value)
    return out


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
    timed = [r for r in rows if _measured(r, "latency_ms_b1")]  # latency: on (the rows of the models it timed)
    if timed:
        sizes = {r.get("latency_batch") for r in timed}
        big = f"latency b{sizes.pop()} (ms)" if len(sizes) == 1 else "latency bN (ms)"
        macs += ["latency b1 (ms)", big]
        shown = [
            {**s, "latency b1 (ms)": _ms(r, "latency_ms_b1"), big: _ms(r, "latency_ms_bN")} for s, r in zip(shown, rows)
        ]
    if any(_measured(r, "latency_check") for r in rows):  # prune.target=latency: the row that met it, checked
        macs.append("latency check")
        shown = [{**s, "latency check": r.get("latency_check")} for s, r in zip(shown, rows)]
    table = markdown_table(shown, ["stage", "top1", "best_top1", "loss", "params (M)", *macs, "epochs", "seconds"])
    text = f"## {title}\n\n{table}\n"
    checked = next((r for r in rows if _measured(r, "latency_check")), None)
    if checked is not None:
        text += (
            f"\nlatency target at batch {checked['latency_target_batch']}: {_ms(checked, 'latency_dense_ms')} -> "
            f"{_ms(checked, 'latency_target_ms')} ms "
            f"({checked['latency_target_speedup']:.2f}x); predicted {_ms(checked, 'latency_predicted_ms')} ms, "
            f"measured {_ms(checked, 'latency_measured_ms')} ms ({checked['latency_measured_speedup']:.2f}x): "
            f"{checked['latency_check']}\n"
        )
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
        # measured speed: the dense row's latency against the pruning stage's row (timed together, same process)
        timed = next((r for r in reversed(rows) if _measured(r, "speedup_bN")), None)
        speed = ""
        if timed is not None and _measured(dense, "latency_ms_bN"):
            speed = (
                f", latency b1 {_ms(dense, 'latency_ms_b1')} -> {_ms(timed, 'latency_ms_b1')} ms "
                f"({timed['speedup_b1']:.2f}x), b{timed['latency_batch']} {_ms(dense, 'latency_ms_bN')} -> "
                f"{_ms(timed, 'latency_ms_bN')} ms ({timed['speedup_bN']:.2f}x) on {timed['latency_threads']} thread(s)"
            )
        text += (
            f"\ndense -> pruned: params {dense['params'] / 1e6:.4f}M -> {final['params'] / 1e6:.4f}M "
            f"({d['params_removed_%']:.2f}% removed), MACs {dense['macs'] / 1e6:.2f}M -> {final['macs'] / 1e6:.2f}M "
            f"({d['macs_removed_%']:.2f}% removed){speed}, top-1 {fmt(dense['top1'])} -> {fmt(final['top1'])} "
            f"({d['top1_change']:+.2f})\n"
        )
    return text


def _measured(row: dict, column: str) -> bool:
    value = row.get(column)
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _ms(row: dict, column: str) -> str | None:
    """A latency in milliseconds with three significant digits (None where the row has none)."""
    if not _measured(row, column):
        return None
    value = row[column]
    return f"{value:#.3g}" if value < 100 else f"{value:.0f}"
