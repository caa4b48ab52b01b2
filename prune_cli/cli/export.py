"""``prune-cli-export RUN``: load a run's pruned model and export it, one line per outcome."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prune_cli.core.atomic import write_text
from prune_cli.core.errors import UserError, one_line
from prune_cli.deploy.export import FORMATS, OPSET, embedded, export
from prune_cli.deploy.load import finished_stages, load
from prune_cli.deploy.quantize import QUANTIZE, export_int8
from prune_cli.structure.counting import count_macs


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="prune-cli-export",
        description="Export the pruned model of a prune_cli run as TorchScript or ONNX, or as INT8 ONNX.",
    )
    parser.add_argument("run", type=Path, help="a run directory (its last finished stage) or a checkpoint file")
    parser.add_argument(
        "--format",
        default=None,
        help="torchscript (model.pt) or onnx (model.onnx); default: what --output ends in, else torchscript",
    )
    parser.add_argument("--stage", default=None, help="export this stage's checkpoint instead of the last finished one")
    parser.add_argument("--output", type=Path, default=None, help="where to write (default: inside the run directory)")
    parser.add_argument("--input-shape", default=None, help="C,H,W when the run's config does not tell it")
    parser.add_argument("--force", action="store_true", help="overwrite an output that holds another run's export")
    parser.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE,
        help="int8: ONNX Runtime static quantization calibrated on the run's training images (ONNX only; "
        "default output model.int8.onnx), with a report of fp32 and int8 test top-1 and latency",
    )
    parser.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="TARGET",
        help="a model=custom factory (package.module:factory) the checkpoint may import and call; repeatable",
    )
    args = parser.parse_args(argv)
    try:
        print(_export_run(args))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: still one line
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1


def _export_run(args) -> str:
    if args.quantize and args.format not in (None, "onnx"):
        raise UserError("--quantize", f"int8 models are ONNX files; drop --format {args.format} or use onnx")
    args.format = _format(args.format or ("onnx" if args.quantize else None), args.output)
    shape = _parse_shape(args.input_shape) if args.input_shape else None
    model, meta = load(args.run, args.stage, trust=args.trust)
    shape = shape or meta["input_shape"]
    if shape is None:
        raise UserError("--input-shape", "the run's config does not tell the input shape; give it as C,H,W")
    if args.input_shape:
        meta = {**meta, "input_shape": shape, "macs": _macs(model, shape)}
    out = args.output or _default_output(meta, args.format)
    if out.is_dir():
        out = out / f"model{FORMATS[args.format]}"
    if args.quantize and args.output is None:
        out = out.with_suffix(f".{args.quantize}{out.suffix}")
    _check_output(out, meta, args.force)
    source = meta["run_dir"] or meta["checkpoint"]
    embed = {k: meta[k] for k in ("stage", "params", "macs", "input_shape", "dataset", "mean", "std", "results")}
    embed |= {"source": str(Path(source).resolve()), "arch": meta["arch"], "config": meta["config"]}
    if args.quantize:
        return _quantized(model, out, shape, embed | {"quantize": args.quantize}, meta)
    difference = export(model, out, args.format, shape, metadata=embed)
    checked = (
        f"outputs equal PyTorch's (max difference {difference:.1e})"
        if difference is not None
        else "not checked (onnxruntime is not installed)"
    )
    kind = f"onnx opset {OPSET}" if args.format == "onnx" else "torchscript"
    macs = f"{meta['macs'] / 1e6:.2f}M" if meta["macs"] is not None else "-"
    status = meta["status"]
    note = f"; the run is {status}" if status not in (None, "done") else ""
    return (
        f"wrote {out} ({kind}; stage {meta['stage']} of {source}{note}; params {meta['params'] / 1e6:.4f}M, "
        f"MACs {macs}; input [batch, {', '.join(map(str, shape))}]; {checked})"
    )


def _quantized(model, out: Path, shape, embed: dict, meta: dict) -> str:
    """Write the INT8 model and its report (``<out>.report.json``); the lines that say what was measured."""
    measured, left = export_int8(model, out, shape, embed, meta["config"])
    report = out.with_suffix(".report.json")
    write_text(report, json.dumps({"model": str(out), "stage": meta["stage"], **measured}, indent=2) + "\n")
    fp32, int8 = measured["fp32"], measured["int8"]
    bits = "7-bit (this CPU has no VNNI)" if measured["weight_bits"] == 7 else "8-bit"
    times = [
        f"b{k[len('latency_ms_b') :]} {fp32[k]:.3f} -> {int8[k]:.3f} ms ({fp32[k] / int8[k]:.2f}x)"
        for k in fp32
        if k.startswith("latency_ms_b")
    ]
    lines = [
        f"wrote {out} (onnx opset {OPSET}, int8 QDQ, per-channel {bits} weights; stage {meta['stage']} of "
        f"{meta['run_dir'] or meta['checkpoint']}) and {report}",
        f"test top-1 fp32 {fp32['top1']:.2f} -> int8 {int8['top1']:.2f}; latency {', '.join(times)}",
    ]
    if left:
        lines.append(f"note: --quantize: {', '.join(left)} layers stay float (ONNX Runtime does not quantize them)")
    return "\n".join(lines)


def _format(fmt: str | None, output: Path | None) -> str:
    """The format asked for, else the one ``--output``'s suffix names (``.onnx``, ``.pt``), else torchscript; a
    suffix of the other format is refused rather than written under a misleading name."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError("--format", f"unknown format {fmt!r}; choose {' or '.join(FORMATS)}")
    named = next((f for f, ext in FORMATS.items() if output is not None and output.suffix == ext), None)
    if fmt is not None and named is not None and named != fmt:
        raise UserError(
            "--format",
            f"{fmt} does not match --output {output} (its suffix {output.suffix} means {named}); drop one of them",
        )
    return fmt or named or "torchscript"


def _macs(model, shape: tuple[int, int, int]) -> int:
    """The model's MACs at ``shape``; a shape it cannot run on is ``--input-shape``'s error."""
    try:
        return count_macs(model, shape)
    except Exception as e:
        shown = "x".join(map(str, shape))
        raise UserError("--input-shape", f"the model does not run on {shown} inputs ({one_line(e)})") from None


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError("--input-shape", f"expected C,H,W (three positive integers); got {text!r}")
    return shape


def _default_output(meta: dict, fmt: str) -> Path:
    """``<run>/model.<ext>`` for the run's last finished stage, ``<run>/model_<stage>.<ext>`` for another one;
    beside a checkpoint outside a run directory, ``model_<stage>.<ext>``."""
    ext, stage = FORMATS[fmt], meta["stage"]
    if meta["run_dir"] is None:
        return Path(meta["checkpoint"]).parent / f"model_{stage}{ext}"
    run_dir = Path(meta["run_dir"])
    last = finished_stages(run_dir)
    return run_dir / (f"model{ext}" if last and last[-1] == stage else f"model_{stage}{ext}")


def _check_output(out: Path, meta: dict, force: bool) -> None:
    """Refuse to overwrite a checkpoint, or without ``force`` a file that is not an export of this run."""
    if out.exists() and out.resolve() == Path(meta["checkpoint"]).resolve():
        raise UserError("--output", f"{out} is the checkpoint being exported; choose another path")
    if not out.exists() or force:
        return
    if out.is_dir():
        raise UserError("--output", f"{out} is a directory")
    theirs = embedded(out)
    ours = str(Path(meta["run_dir"] or meta["checkpoint"]).resolve())
    if theirs is None:
        raise UserError("--output", f"{out} exists and is not a prune_cli export; choose another path or pass --force")
    if theirs.get("source") != ours:
        raise UserError(
            "--output",
            f"{out} holds an export of another run ({theirs.get('source')}); choose another path or pass --force",
        )


if __name__ == "__main__":
    sys.exit(main())
