"""The torchvision zoo compatibility matrix: the smallest network of every classification family, half its params
pruned through the Python API and through the command line (prune, finetune, export), one row per network.

Each family is a builder module of ``torchvision.models`` (resnet holds resnext and wide_resnet); its network is
the variant with the fewest params at 10 classes (counted without allocating weights), random init. Its input is
the smallest square side from 32 up (CIFAR's size; many networks run on less, but counts at 1x1 mean little) on
which it runs in eval mode (batch 1) and in train mode (batch 2, auxiliary heads included).

- Python API: ``prune_cli.prune(model, x, 0.5, target="params")``, then the pruned copy runs in train and in eval
  mode. A ``ValueError`` / ``TypeError`` of ``prune`` is its refusal; anything else is a failure.
- Command line: ``prune-cli model=torchvision model.network=NAME dataset=synthetic ... debug=smoke`` (default
  settings otherwise: pretrain, prune 50% of params, finetune), then ``prune-cli-export RUN`` as TorchScript and as
  ONNX (each file checked against PyTorch by the command itself). A failure is the command's last stderr line.

Params and MACs follow docs/counting.md. Usage:

    python scripts/zoo.py [--families resnet,vgg] [--api-only] [--write docs/zoo.md]

It prints the table and the seconds each row took; ``--write`` rewrites the table between the markers
``<!-- zoo:begin -->`` and ``<!-- zoo:end -->`` of the page (without the timings, so a rerun on the same code
writes the same page): the rows of the families run, the page's other rows kept.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torchvision
from torch.overrides import TorchFunctionMode

import prune_cli
from prune_cli.core.errors import one_line

FAMILIES = {  # family -> its builder module in torchvision.models
    "alexnet": "alexnet",
    "convnext": "convnext",
    "densenet": "densenet",
    "efficientnet": "efficientnet",
    "googlenet": "googlenet",
    "inception": "inception",
    "maxvit": "maxvit",
    "mnasnet": "mnasnet",
    "mobilenet_v2": "mobilenetv2",
    "mobilenet_v3": "mobilenetv3",
    "regnet": "regnet",
    "resnet": "resnet",
    "shufflenet_v2": "shufflenetv2",
    "squeezenet": "squeezenet",
    "swin": "swin_transformer",
    "swin_v2": "swin_transformer:swin_v2",  # its v2 variants: another attention (cosine, position bias MLP)
    "vgg": "vgg",
    "vit": "vision_transformer",
}
NUM_CLASSES = 10
RATIO = 0.5
FIRST_SIDE, LAST_SIDE = 32, 512  # the input sides tried, smallest first
FIXED_SIDE = 224  # torchvision's classification size, for the networks of one input size
CLI_IMAGES = 64  # train and test images of the command-line run (debug=smoke takes 64 of each)
LONGEST_REASON = 200  # characters of a reason the table shows (torch's exporter errors run on for lines)
BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
HEADER = "| network (family) | input | Python API: params, MACs | command line: params, MACs; finetune, export |"


class _WeightsOnMeta(TorchFunctionMode):
    """``torch.empty`` without a device makes meta tensors: layers' weights take no memory (so the largest variants
    are counted too) while the builders' own arithmetic (regnet's widths) still runs on real numbers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build(name: str, weights_on_meta: bool = False) -> torch.nn.Module:
    """``name`` as ``model=torchvision`` builds it: random init (seed 0), 10 classes."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet's and inception's notice about their init
        if weights_on_meta:
            with _WeightsOnMeta():
                return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
        return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)


def variants(family: str) -> list[str]:
    """The classification networks whose builder lives in the family's module (``module:prefix``: those of its
    networks whose names start with the prefix)."""
    module, _, prefix = FAMILIES[family].partition(":")
    names = torchvision.models.list_models(module=torchvision.models)
    builders = [
        n for n in names if torchvision.models.get_model_builder(n).__module__ == f"torchvision.models.{module}"
    ]
    return [n for n in builders if n.startswith(prefix)]


def smallest_variant(family: str) -> str:
    """The family's network with the fewest params at 10 classes (ties: the first name)."""
    counts = {n: sum(p.numel() for p in build(n, weights_on_meta=True).parameters()) for n in variants(family)}
    return min(counts, key=lambda n: (counts[n], n))


def runs_on(model: torch.nn.Module, side: int) -> bool:
    """Whether ``model`` runs on ``side`` x ``side`` images in eval mode (batch 1) and train mode (batch 2)."""
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, side, side))
            model.train()(torch.randn(2, 3, side, side))
        return True
    except Exception:  # any error of the network's own code: it does not run at this side
        return False
    finally:
        model.eval()


def smallest_side(model: torch.nn.Module) -> int | None:
    """The smallest square input side from 32 up the model runs on in both modes: doubled until it runs, then
    bisected (a larger input never makes a feature map smaller); a network of one input size (ViT's, MaxViT's
    224 x 224) runs at no power of two: then 224, if it runs there; None if none up to 512 does."""
    low, high = FIRST_SIDE - 1, FIRST_SIDE  # low: known not to run (or below the range)
    while not runs_on(model, high):
        if high >= LAST_SIDE:
            return FIXED_SIDE if runs_on(model, FIXED_SIDE) else None
        low, high = high, min(2 * high, LAST_SIDE)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if runs_on(model, middle) else (middle, high)
    return high


def api_row(name: str, side: int) -> dict:
    """The Python API's outcome: the table of ``prune_cli.prune`` once the pruned copy ran in both modes, or the
    one-line refusal or failure."""
    model = build(name)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the graph's notes; the table's unprunable share says it
            pruned, table = prune_cli.prune(model, x, RATIO, target="params")
    except (ValueError, TypeError) as e:
        return {"outcome": "refused", "reason": one_line(e)}
    except Exception as e:  # a bug, reported as the row's outcome
        return {"outcome": "failed", "reason": one_line(e)}
    for mode in ("train", "eval"):
        try:
            with torch.no_grad():
                getattr(pruned, mode)()(x)
        except Exception as e:
            return {"outcome": "failed", "reason": f"the pruned copy in {mode} mode: {one_line(e)}"}
    keys = ("params", "params_pruned", "macs", "macs_pruned", "unprunable_share")
    return {"outcome": "pruned", **{k: table[k] for k in keys}}


def cli_arguments(name: str, side: int, run_dir: str) -> list[str]:
    """The command line's overrides: the network on a few synthetic images of its side, a smoke schedule."""
    return [
        "model=torchvision",
        f"model.network={name}",
        "dataset=synthetic",
        f"dataset.image_size={side}",
        f"dataset.train_size={CLI_IMAGES}",
        f"dataset.test_size={CLI_IMAGES}",
        "debug=smoke",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
    ]


def command(module: str, *arguments: str, cwd: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGUMENTS`` as a user runs the installed command."""
    return subprocess.run([sys.executable, "-m", module, *arguments], cwd=cwd, capture_output=True, text=True)


def last_line(result: subprocess.CompletedProcess) -> str:
    """The last non-empty line of a failed command's stderr (its one-line error)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit code {result.returncode}, nothing on stderr"


def cli_row(name: str, side: int) -> dict:
    """The command line's outcome: params and MACs before and after its prune stage, whether it finetuned, and its
    exports; or the failing command's last stderr line."""
    with tempfile.TemporaryDirectory(prefix="zoo-") as work:
        run = command("prune_cli", *cli_arguments(name, side, "run"), cwd=work)
        if run.returncode != 0:
            return {"outcome": "failed", "reason": last_line(run).replace(f"{work}/", "")}  # the run's own paths
        rows = pd.read_csv(Path(work) / "run" / "results.csv").set_index("stage")
        if "prune" not in rows.index or "finetune" not in rows.index:
            return {"outcome": "failed", "reason": f"the run's stages were {', '.join(rows.index)}"}
        dense, pruned = rows.iloc[0], rows.loc["prune"]
        row = {"outcome": "pruned", "params": dense["params"], "macs": dense["macs"]}
        row |= {"params_pruned": pruned["params"], "macs_pruned": pruned["macs"]}
        return {**row, "export": "finetuned; " + exports(work)}


def exports(work: str) -> str:
    """What ``prune-cli-export`` made of the run in ``work``: each format exported, or its failure's last line."""
    said = []
    for kind, label in (("torchscript", "TorchScript"), ("onnx", "ONNX")):
        export = command("prune_cli.cli.export", "run", "--format", kind, cwd=work)
        ok = export.returncode == 0
        reason = shortened(last_line(export).replace(f"{work}/", ""))
        said.append(f"{label} exported" if ok else f"{label} export failed: {reason}")
    return "; ".join(said)


def millions(n: float) -> str:
    """A count in millions, three decimals."""
    return f"{n / 1e6:.3f}M"


def change(before: float, after: float) -> str:
    """``before -> after (-share)``."""
    return f"{millions(before)} → {millions(after)} (−{1 - after / before:.1%})"


def shortened(reason: str) -> str:
    """The reason, cut after ``LONGEST_REASON`` characters, its pipes escaped for the table."""
    if len(reason) > LONGEST_REASON:
        reason = reason[:LONGEST_REASON].rstrip() + " …"
    return reason.replace("|", "\\|")


def cell(outcome: dict) -> str:
    """A table cell: the counts before and after, or the refusal or failure with its reason."""
    if outcome["outcome"] != "pruned":
        return f"{outcome['outcome']}: {shortened(outcome['reason'])}"
    text = f"params {change(outcome['params'], outcome['params_pruned'])}, "
    text += f"MACs {change(outcome['macs'], outcome['macs_pruned'])}"
    if "unprunable_share" in outcome:
        text += f"; {outcome['unprunable_share']:.1%} of the channels unprunable"
    return f"{text}; {outcome['export']}" if "export" in outcome else text


def row(family: str, api_only: bool) -> tuple[str, float]:
    """The family's table row and the seconds it took."""
    start = time.perf_counter()
    name = smallest_variant(family)
    side = smallest_side(build(name))
    if side is None:
        why = f"failed: runs on no square input from {FIRST_SIDE} to {LAST_SIDE} in eval and train mode"
        return f"| `{name}` ({family}) | - | {why} | {why} |", time.perf_counter() - start
    api = cell(api_row(name, side))
    cli = "not run (--api-only)" if api_only else cell(cli_row(name, side))
    return f"| `{name}` ({family}) | {side}x{side} | {api} | {cli} |", time.perf_counter() - start


def write(page: Path, rows: dict[str, str]) -> None:
    """Put the table between the page's markers: the families' new ``rows`` (family -> row), and the rows it held
    of the families not run this time, in the order of ``FAMILIES``."""
    text = page.read_text()
    found = re.search(re.escape(BEGIN) + "(.*?)" + re.escape(END), text, flags=re.S)
    if found is None:
        raise SystemExit(f"{page} has no {BEGIN} / {END} markers")
    held = {}
    for line in found.group(1).splitlines():
        family = re.match(r"\| `[^`]+` \(([a-z0-9_]+)\) \|", line)
        if family:
            held[family.group(1)] = line
    table = [HEADER, "|---|---|---|---|"] + [rows.get(f) or held[f] for f in FAMILIES if f in rows or f in held]
    block = "\n".join([BEGIN, *table, END])
    page.write_text(text[: found.start()] + block + text[found.end() :])
    print(f"wrote the table into {page}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of: " + ", ".join(FAMILIES))
    parser.add_argument("--api-only", action="store_true", help="the Python API only (no command-line runs)")
    parser.add_argument(
        "--write", type=Path, default=None, help="rewrite these families' rows of the table between the page's markers"
    )
    args = parser.parse_args()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}; the families are {', '.join(FAMILIES)}")
    rows = {}
    print(f"{HEADER} seconds |\n|---|---|---|---|---|", flush=True)
    for family in families:
        rows[family], seconds = row(family, args.api_only)
        print(f"{rows[family]} {seconds:.1f} |", flush=True)
    if args.write:
        write(args.write, rows)


if __name__ == "__main__":
    main()
