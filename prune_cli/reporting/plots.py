"""Figures of a sweep and of one run, each written as PNG and SVG (matplotlib, the optional ``plots`` extra).

- ``top1_vs_macs`` / ``top1_vs_params`` (beside a sweep's tables): final top-1 against the share of MACs / params
  removed, one line per method with sample-std error bars, the dense accuracy as a dashed reference line;
- ``widths`` (in a run's directory, from ``layers.csv``): the channels of every prunable group before and after
  pruning;
- ``curves`` (in a run's directory, from ``metrics.csv``): loss, top-1 and learning rate per epoch over all stages
  in order, the stage boundaries marked.

Headless: figures are drawn with ``matplotlib.figure.Figure`` (no pyplot, no window, no global backend choice),
and matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

MACS_LABEL = "MACs removed (%): conv + linear multiply-accumulates, one image"
PARAMS_LABEL = "params removed (%): every parameter (BN affine and biases included)"
TOP1_LABEL = "final top-1 (%): test set, mean ± sample std over seeds"


class Unavailable(ImportError):
    """matplotlib is not installed."""


def require():
    """matplotlib's Figure class, or Unavailable with what to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise Unavailable("matplotlib is not installed (pip install 'prune-cli[plots]')") from None
    return Figure


def save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1])
    return paths


def sweep_plots(lines: list[dict], out_dir: Path) -> list[Path]:
    """top1_vs_macs and top1_vs_params of ``lines`` ({"method", "points": [{"macs", "params", "top1", "std", "n"}],
    "dense"}: report.plot_series); nothing when no group has a pruned result."""
    if not any(line["points"] for line in lines):
        return []
    written = []
    for x, label in (("macs", MACS_LABEL), ("params", PARAMS_LABEL)):
        written += save(tradeoff(lines, x, label), Path(out_dir) / f"top1_vs_{x}")
    return written


def tradeoff(lines: list[dict], x: str, xlabel: str):
    fig = require()(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    denses = {round(line["dense"], 6) for line in lines if line["dense"] is not None}
    colors = [f"C{i % 10}" for i in range(len(lines))]
    for line, color in zip(lines, colors):
        points = sorted(line["points"], key=lambda p: p[x])
        ax.errorbar(
            [p[x] for p in points],
            [p["top1"] for p in points],
            yerr=[0.0 if p["std"] is None else p["std"] for p in points],
            marker="o",
            capsize=3,
            color=color,
            label=f"{line['method']} (n={'/'.join(str(p['n']) for p in points)})",
        )
        if len(denses) > 1 and line["dense"] is not None:  # each method its own dense model
            ax.axhline(line["dense"], color=color, linestyle="--", linewidth=1, label=f"dense, {line['method']}")
    if len(denses) == 1:
        ax.axhline(denses.pop(), color="black", linestyle="--", linewidth=1, label="dense (mean over the runs)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(TOP1_LABEL)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def run_plots(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """widths (from layers.csv) and curves (from metrics.csv) of the run in ``run_dir`` into ``out_dir`` (default
    ``run_dir``); each only where its table exists and has rows (a run that did not prune has no layers.csv, one
    that did not train no epochs)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    title = run_title(run_dir)
    written = []
    layers, metrics = run_dir / "layers.csv", run_dir / "metrics.csv"
    if layers.is_file() and layers.stat().st_size:
        df = pd.read_csv(layers)
        if len(df) and {"layer", "before", "after"} <= set(df.columns):
            written += save(widths(df, title), out_dir / "widths")
    if metrics.is_file() and metrics.stat().st_size:
        df = pd.read_csv(metrics)
        if len(df) and {"stage", "epoch"} <= set(df.columns):
            written += save(curves(df, title), out_dir / "curves")
    return written


def run_title(run_dir: Path) -> str:
    """The run's identity (from results.csv), else its directory."""
    try:
        final = pd.read_csv(run_dir / "results.csv").iloc[-1]
        names = ("model", "dataset", "regularizer", "criterion", "target", "ratio", "seed")
        return ", ".join(f"{k}={final[k]}" for k in names if k in final.index)
    except (OSError, IndexError, ValueError, pd.errors.ParserError):
        return str(run_dir)


def widths(df: pd.DataFrame, title: str):
    n = len(df)
    fig = require()(figsize=(max(6.0, 0.32 * n + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    pos = range(n)
    ax.bar([i - 0.2 for i in pos], df["before"], width=0.4, color="0.75", label="before pruning")
    ax.bar([i + 0.2 for i in pos], df["after"], width=0.4, color="C0", label="after pruning")
    ax.set_xticks(list(pos), [str(v) for v in df["layer"]], rotation=90, fontsize="small")
    ax.set_xlabel("prunable channel group (its producing conv)")
    ax.set_ylabel("channels (output channels of the group)")
    before, after = df["before"].sum(), df["after"].sum()
    removed = f"channels {before} -> {after} ({100 * (1 - after / before):.1f}% removed)"
    ax.set_title(f"{textwrap.fill(title, 80)}\n{removed}", fontsize="small")
    ax.legend(fontsize="small")
    return fig


def curves(df: pd.DataFrame, title: str):
    """Loss, top-1 and lr against the epoch counted over all stages; a network index (grafting's ``net``) draws
    each network's training curve."""
    df = df.copy()
    nets = sorted(df["net"].dropna().unique()) if "net" in df.columns else [None]
    steps = list(dict.fromkeys(zip(df["stage"], df["epoch"])))  # (stage, epoch) in the order they ran
    position = {k: i + 1 for i, k in enumerate(steps)}
    df["x"] = [position[k] for k in zip(df["stage"], df["epoch"])]
    fig = require()(figsize=(8, 7.5), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    panels = (
        ("loss (cross-entropy)", (("train_loss", "train"), ("test_loss", "test"))),
        ("top-1 (%)", (("train_acc", "train"), ("test_acc", "test"))),
        ("learning rate", (("lr", None),)),
    )
    for ax, (ylabel, series) in zip(axes, panels):
        for column, name in series:
            if column not in df.columns:
                continue
            for k, net in enumerate(nets):
                part = df if net is None else df[df["net"] == net]
                part = part[part[column].notna()]
                if part.empty:
                    continue
                suffix = "" if net is None else f" net {int(net)}"
                ax.plot(part["x"], part[column], marker=".", linestyle="-" if k == 0 else ":", label=f"{name}{suffix}")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines and len(ax.lines) > 1:
            ax.legend(fontsize="small")
    if "lr" in df.columns and (df["lr"].dropna() > 0).all() and df["lr"].notna().any():
        axes[2].set_yscale("log")
    starts = {}
    for (stage, _), i in zip(steps, range(1, len(steps) + 1)):
        starts.setdefault(stage, i)
    for stage, start in starts.items():
        for ax in axes:
            ax.axvline(start - 0.5, color="0.5", linestyle="--", linewidth=0.8)
        axes[0].annotate(
            stage, (start - 0.5, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", fontsize="small"
        )
    from matplotlib.ticker import MaxNLocator

    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlim(0.4, len(steps) + 0.6)
    axes[-1].set_xlabel("epoch, over all stages in order (dashed: a stage begins)")
    axes[0].set_title(textwrap.fill(title, 100), fontsize="small")
    return fig
