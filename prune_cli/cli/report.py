"""``prune-cli-report DIR...``: aggregate any directories of runs (sweeps, or runs collected by hand), pivot
(``--by``, ``--columns``), print md / csv / latex / json and plot (``--plots``).

It reads its DIRs and never writes them (a read-only archive is fine): the tables go to stdout, files only into
``--output DIR``. Exit codes: 0 every job done; 1 a job failed, is dead (killed), unreadable, interrupted or never
started; 2 bad input (one line ``error: <what>: <why>``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from prune_cli.core.errors import UserError
from prune_cli.reporting import plots
from prune_cli.reporting.aggregate import VALUES, Summary, collect
from prune_cli.reporting.collect import NOT_DONE, jobs_markdown
from prune_cli.reporting.render import (
    FORMATS,
    emit,
    pivot,
    render,
    sort_key,
    summary_cells,
    summary_notes,
    summary_title,
    sweep_plots,
    write_tables,
)


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
    parser.add_argument("--plots", action="store_true", help="write the sweep plots and each run's plots (--output)")
    parser.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="a folder for files: the tables (sweep.* and sweep_summary.*) and the plots",
    )
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
    """Print the tables (and write them, and the plots, into --output); the exit status (0, or 1: not all done)."""
    for d in args.dirs:
        if not d.is_dir():
            raise UserError("dir", f"{d} is not a directory")
    by, columns, out = keys_of(args.by), keys_of(args.columns), args.output
    if args.plots:
        try:
            plots.require()
        except plots.Unavailable as e:
            raise UserError("--plots", str(e)) from None
        if out is None:
            raise UserError("--output", "--plots writes files: name a folder for them (--output DIR)")
    jobs, summary = collect(args.dirs)
    if not jobs:
        raise UserError("dir", f"no runs found below {' '.join(map(str, args.dirs))}")
    check_keys(summary, by, columns)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_tables(out, jobs, summary)
    emit(table_text(args, summary, jobs, by, columns))
    status = 1 if summary.missing or any(row["status"] in NOT_DONE for _, row in jobs) else 0
    if args.plots:
        status = max(status, write_plots(summary, out, jobs))
    return status


def check_keys(summary: Summary, by: list[str], columns: list[str]) -> None:
    """Refuse a --by / --columns key that does not group these runs, the seed, or one key given twice."""
    for option, keys in (("--by", by), ("--columns", columns)):
        for k in keys:
            if k == "seed":
                raise UserError(option, "seed is what a group averages over, not a key of the table")
            if k not in summary.names:
                differ = ", ".join(summary.varying) or "nothing but the seed"
                raise UserError(option, f"no setting {k} groups these runs (they differ in: {differ})")
    if set(by) & set(columns):
        raise UserError("--columns", f"{', '.join(sorted(set(by) & set(columns)))} is already a row key (--by)")


def table_text(args, summary: Summary, jobs: list, by: list[str], columns: list[str]) -> str:
    """What is printed: a pivot (--columns), else the summary (md without --by: the jobs table first)."""
    if columns:
        title, names, cells, raw = pivot(summary, by, columns, args.value)
        return render(args.format, title, names, cells, raw, summary_notes(summary)[1:])
    if by:  # the key columns reordered: these first, then the others; groups sorted by them
        summary.keys = [*by, *[k for k in summary.keys if k not in by]]
        summary.groups.sort(key=lambda g: [sort_key(g["label"][k]) for k in by])
        for g in summary.groups:
            g["row"] = {**{k: g["label"][k] for k in summary.keys}, **g["row"]}
    names, cells = summary_cells(summary)
    text = render(args.format, summary_title(summary), names, cells, summary.rows, summary_notes(summary))
    if args.format == "md" and not by:  # the jobs first, as after a sweep
        text = jobs_markdown([row for _, row in jobs], []) + "\n" + text
    return text


def write_plots(summary: Summary, out: Path, jobs: list[tuple[Path, dict]]) -> int:
    """The sweep plots into ``out`` and each run's plots into ``out/<job>``; one line to stderr saying where, one
    line per file that could not be plotted. Returns the exit status (1 if any could not)."""

    status, written = 0, []
    try:
        written += sweep_plots(summary, out)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: plots: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        status = 1
    for path, row in jobs:
        try:
            written += plots.run_plots(path, out / job_folder(str(row["job"])))
        except (OSError, ValueError, KeyError, pd.errors.ParserError) as e:
            print(f"error: {path}: cannot plot ({type(e).__name__}: {e})".splitlines()[0], file=sys.stderr)
            status = 1
    print(f"plots: wrote {len(written)} files ({', '.join(sorted({p.name for p in written}))})", file=sys.stderr)
    return status


def job_folder(job: str) -> Path:
    """Where a job's plots go below --output: its name as a relative path (a lone run: --output itself)."""
    return Path(*[part for part in Path(job).parts if part not in ("/", ".", "..")])
