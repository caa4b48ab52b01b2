"""A summary as text: its cells, notes and title, pivots, and the md / csv / latex / json forms."""

from __future__ import annotations

import io
import json
import statistics
import sys
from pathlib import Path

import pandas as pd

from prune_cli.core.atomic import write_text
from prune_cli.reporting import plots
from prune_cli.reporting.aggregate import AMOUNT_KEYS, VALUES, Summary, key_text
from prune_cli.reporting.collect import SPEEDUP_COLUMNS, jobs_markdown, number, write_jobs
from prune_cli.run.tables import fmt, markdown_table, write_csv

FORMATS = ("md", "csv", "latex", "json")

SUMMARY_CSV, SUMMARY_MD = "sweep_summary.csv", "sweep_summary.md"


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
    return notes + job_notes(summary)


def job_notes(summary: Summary) -> list[str]:
    """The sweeps' jobs that never started and the directories that hold one run, one line each (if any)."""
    notes = []
    if summary.missing:
        notes.append(f"never started ({len(summary.missing)} of {summary.expected} jobs): {'; '.join(summary.missing)}")
    if summary.copies:
        notes.append(f"copies of one run, counted once: {'; '.join(summary.copies)}")
    return notes


def summary_title(summary: Summary) -> str:
    return f"runs grouped by every setting but the seed: {len(summary.groups)} group(s) of {summary.jobs} job(s)"


def summary_markdown(summary: Summary) -> str:
    """The summary table as sweep_summary.md holds it (and a sweep prints it)."""
    columns, cells = summary_cells(summary)
    return render("md", summary_title(summary), columns, cells, summary.rows, summary_notes(summary))


def write_tables(out_dir: Path, jobs: list[tuple[Path, dict]], summary: Summary) -> None:
    """sweep.csv / sweep.md (a row per job) and sweep_summary.csv (numbers in full) / sweep_summary.md (the printed
    table) into ``out_dir``."""
    out_dir = Path(out_dir)
    rows = [row for _, row in jobs]
    write_jobs(out_dir, rows, jobs_markdown(rows, job_notes(summary)))
    write_csv(out_dir / SUMMARY_CSV, summary.rows)
    write_text(out_dir / SUMMARY_MD, summary_markdown(summary))


# what a terminal without UTF-8 shows instead of the tables' few non-ASCII signs
ASCII_FALLBACKS = str.maketrans({"±": "+/-", "→": "->", "−": "-", "—": "--", "–": "-", "×": "x", "≥": ">=", "≤": "<="})


def emit(text: str, stream=None) -> None:
    """Write ``text`` to ``stream`` (stdout) in an encoding it can take: under a locale without UTF-8 the signs
    above in ASCII and anything else that cannot be encoded as "?", never a UnicodeEncodeError."""
    stream = stream if stream is not None else sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        text = text.translate(ASCII_FALLBACKS).encode(encoding, errors="replace").decode(encoding)
    except LookupError:  # a stream naming an encoding Python does not know: ASCII is safe anywhere
        text = text.translate(ASCII_FALLBACKS).encode("ascii", errors="replace").decode("ascii")
    stream.write(text)
    stream.flush()


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

    return plots.sweep_plots(plot_series(summary), Path(out_dir))
