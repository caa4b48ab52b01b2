"""Deployable pruned models: ``load`` rebuilds a run's pruned model (eval mode, CPU) with its metadata, without a
Hydra config; ``export`` writes a model as TorchScript or ONNX and checks the file's outputs against PyTorch's;
``prune-cli-export RUN`` does both from the command line, one line per outcome.

Which checkpoint is "the pruned model" of a run directory: that of its last finished stage, i.e. the last row of
``results.csv`` whose stage left a finished ``checkpoints/<stage>.pt`` (a stage still training has no row yet);
``stage=`` / ``--stage`` picks another one. A checkpoint file is taken as it is.

Exports are traced on the CPU at the run's input shape with a dynamic batch dimension. The layer kinds methods put
into models export in both formats (README, "Using a pruned model"); a model that does not export is refused in
one line naming its smallest layer that fails, and why. A written file
is read back and its outputs compared with PyTorch's on a random batch of another size before it replaces anything.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import math
import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.jit import TracerWarning

from . import __version__
from .errors import UserError

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}
# ONNX opset 17: ScatterElements with reduction="add" (opset >= 16) is what an index_add with repeated indices
# needs (see _index_add_symbolic); onnxruntime >= 1.17 (the export extra) runs it.
OPSET = 17
TOLERANCE = 1e-4  # rtol and atol (atol relative to the largest output) of the check of a written file
META = "prune_cli.json"  # the metadata every export carries: TorchScript extra file, ONNX metadata_props key


# --------------------------------------------------------------------------- load


def load(path: str | os.PathLike, stage: str | None = None) -> tuple[nn.Module, dict]:
    """``(model, metadata)`` of a run directory (its last finished stage, or ``stage``) or of a checkpoint file.

    The model is rebuilt from the checkpoint's ``arch`` (layers methods added included) on the CPU, in eval mode.
    ``metadata``: ``stage``, ``arch``, ``params`` and ``macs`` (the counting convention of ``measure``),
    ``results`` (the stage's row of ``results.csv``, or of the checkpoint's own rows), ``status`` (the run's, from
    ``status.json``), ``input_shape`` ``(C, H, W)``, ``dataset``, ``mean`` and ``std`` (the normalisation
    ``(x / 255 - mean) / std`` per channel, None when the dataset computes them from its train split),
    ``config`` (the run's resolved config), ``provenance``, ``checkpoint`` and ``run_dir`` (paths).
    Bad input raises ``UserError``.
    """
    from . import builtin  # noqa: F401  (registers the model families and the layer kinds methods add)
    from .measure import count_macs, count_params
    from .models import build_model

    path = Path(path)
    if not path.exists():
        raise UserError("run", f"{path} does not exist")
    if path.is_dir():
        run_dir = path
        ck_path, ck = _run_checkpoint(path, stage)
    else:
        if stage is not None:
            raise UserError(
                "--stage", f"{path} is the checkpoint of one stage; --stage picks a stage of a run directory"
            )
        ck_path, ck = path, _read(path)
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        if run_dir is not None and not (run_dir / "results.csv").is_file():
            run_dir = None
    if not ck.get("done", True):
        raise UserError(
            "--stage" if stage else "run",
            f"{ck_path} is unfinished (its {ck.get('stage')} stage stopped after epoch {ck.get('epoch')}); "
            "resume that run first, or pick a finished stage",
        )
    try:
        model = build_model(ck["arch"])
        model.load_state_dict(ck["state_dict"])
    except UserError as e:  # a model family this installation does not know (an extension not imported)
        raise UserError("run", f"{ck_path} does not rebuild ({e})") from None
    except Exception as e:
        raise UserError("run", f"{ck_path} does not rebuild ({_brief(e)})") from None
    model.eval()

    config = ck.get("config") or {}
    dataset = config.get("dataset") or {}
    input_shape, mean, std = _input_of(dataset, ck["arch"])
    name = ck.get("stage", ck_path.stem)
    results = _results_row(run_dir, name) if run_dir is not None else None
    if results is None:
        results = next((_clean(r) for r in reversed(ck.get("rows") or []) if r.get("stage") == name), None)
    metadata = {
        "stage": name,
        "arch": ck["arch"],
        "params": count_params(model),
        "macs": count_macs(model, input_shape) if input_shape else None,
        "results": results,
        "status": _status(run_dir) if run_dir is not None else None,
        "input_shape": input_shape,
        "dataset": dataset.get("name"),
        "mean": mean,
        "std": std,
        "config": config or None,
        "provenance": ck.get("provenance"),
        "checkpoint": str(ck_path),
        "run_dir": str(run_dir) if run_dir is not None else None,
    }
    return model, metadata


def finished_stages(run_dir: Path) -> list[str]:
    """The stages of a run directory that finished with a checkpoint, in the order they ran (``results.csv``)."""
    have = {p.stem for p in (Path(run_dir) / "checkpoints").glob("*.pt")}
    rows = _read_results(run_dir)
    seen: list[str] = []
    for row in rows:
        if row.get("stage") in have and row["stage"] not in seen:
            seen.append(row["stage"])
    return seen


def _run_checkpoint(run_dir: Path, stage: str | None) -> tuple[Path, dict]:
    ck_dir = run_dir / "checkpoints"
    if not ck_dir.is_dir():
        below = sorted(p.parent for p in run_dir.glob("*/checkpoints"))
        hint = f"; it holds runs below it, e.g. {below[0]}" if below else ""
        raise UserError("run", f"{run_dir} is not a run directory or a checkpoint (no checkpoints/){hint}")
    finished = finished_stages(run_dir)
    have = finished + sorted({p.stem for p in ck_dir.glob("*.pt")} - set(finished))  # in the order they ran
    if stage is not None:
        if stage not in have:
            raise UserError("--stage", f"{run_dir} has no checkpoint of stage {stage!r}; it has {_listing(have)}")
        return ck_dir / f"{stage}.pt", _read(ck_dir / f"{stage}.pt")
    for name in reversed(finished):
        ck = _read(ck_dir / f"{name}.pt")
        if ck.get("done", True):
            return ck_dir / f"{name}.pt", ck
    raise UserError(
        "run", f"{run_dir} has no finished stage yet (checkpoints: {_listing(have)}; results.csv lists none of them)"
    )


def _read(path: Path) -> dict:
    from .rundir import load_checkpoint  # the one reader of every checkpoint schema

    try:
        ck = load_checkpoint(path)
    except UserError as e:
        raise UserError("run", e.why) from None
    except Exception as e:
        raise UserError("run", f"{path} is not a prune_cli checkpoint ({_brief(e)})") from None
    if not isinstance(ck, dict) or "arch" not in ck or "state_dict" not in ck:
        raise UserError("run", f"{path} is not a prune_cli checkpoint (no arch and state_dict)")
    return ck


def _input_of(dataset: dict, arch: dict) -> tuple[tuple[int, int, int] | None, tuple | None, tuple | None]:
    """(C, H, W) of the recorded dataset and its published normalisation, as far as the config tells them."""
    from .data import DATASETS, describe

    try:
        shape = tuple(int(s) for s in describe(dataset)[0])
    except Exception:  # an extension's dataset, or a config of another version: not known
        return None, None, None
    if shape[0] != arch.get("in_channels", shape[0]):
        return None, None, None
    spec = DATASETS.get(dataset["name"])
    mean, std = tuple(getattr(spec, "mean", ()) or ()), tuple(getattr(spec, "std", ()) or ())
    return shape, mean or None, std or None


def _read_results(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [_clean(row) for row in csv.DictReader(f)]


def _results_row(run_dir: Path, stage: str) -> dict | None:
    return next((r for r in reversed(_read_results(run_dir)) if r.get("stage") == stage), None)


def _clean(row: dict) -> dict:
    """A results row with numbers as numbers and empty or NaN cells as None (JSON-safe)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, str):
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
            value = None if value == "" else value
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _listing(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def _brief(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


# --------------------------------------------------------------------------- export


def export(
    model: nn.Module,
    path: str | os.PathLike,
    fmt: str,
    input_shape: tuple[int, int, int],
    *,
    metadata: dict | None = None,
) -> float | None:
    """Write ``model`` (a float32 CPU copy in eval mode, training-time factors folded) to ``path`` as ``fmt``
    (``torchscript``: ``torch.jit.trace``; ``onnx``: opset 17, input ``input`` [batch, C, H, W], output
    ``logits``), with ``metadata`` embedded as JSON (``prune_cli.json``). The file is written beside ``path``,
    read back and run on a random batch of another size; only if its outputs equal PyTorch's (rtol and atol 1e-4)
    does it replace ``path``. Returns the largest difference (None: ONNX without onnxruntime to check it).
    A model that does not export is refused with ``UserError`` naming its first layer that fails and why.
    """
    if fmt not in FORMATS:
        raise UserError("--format", f"unknown format {fmt!r}; choose {' or '.join(FORMATS)}")
    from .models.layers import fold

    model = fold(copy.deepcopy(model)).to("cpu", torch.float32).eval()
    input_shape = tuple(int(s) for s in input_shape)
    g = torch.Generator().manual_seed(0)
    example, check = torch.randn(2, *input_shape, generator=g), torch.randn(3, *input_shape, generator=g)
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:
        raise UserError(
            "--input-shape", f"the model does not run on {_shape(input_shape)} inputs ({_brief(e)})"
        ) from None
    blob = json.dumps({"prune_cli": __version__, "format": fmt, **(metadata or {})}, default=str)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            difference = _write(model, Path(tmp), fmt, example, check, blob)
        except _Refused as e:
            culprit = _culprit(model, fmt, example, check)
            raise UserError("--format", f"cannot export {culprit or 'the model'} as {fmt}: {e}") from None
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return difference


class _Refused(Exception):
    """The exporter failed or its file computes something else; the message says which."""


def _write(model: nn.Module, path: Path, fmt: str, example, check, blob: str | None) -> float | None:
    """Export ``model`` traced on ``example`` to ``path`` (a path or a BytesIO), read it back and compare its
    outputs on ``check`` with PyTorch's; raises _Refused with the reason."""
    with torch.no_grad():
        expected = model(check)
    if not isinstance(expected, torch.Tensor):
        raise _Refused(f"its forward returns {type(expected).__name__}, not one tensor")
    if fmt == "torchscript":
        got = _torchscript(model, path, example, check, blob)
    else:
        got = _onnx(model, path, example, check, blob)
    if got is None:
        return None
    got = torch.as_tensor(got)
    if got.shape != expected.shape:
        raise _Refused(f"the written model returns shape {tuple(got.shape)} for {tuple(expected.shape)}")
    difference = float((got - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if not torch.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE * scale):
        raise _Refused(
            f"the written model's outputs differ from PyTorch's by {difference:.2g} (more than {TOLERANCE:g}); "
            "the trace fixed something that depends on the input"
        )
    return difference


@contextlib.contextmanager
def _quiet():
    """No warnings (torch.jit is deprecated; tracer notes), except an exporter's note that its result will be
    wrong, which refuses; and no C++ log on stdout (the ONNX exporter prints its graph there when it fails)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.stdout.flush()
        try:
            saved = os.dup(1)
        except OSError:  # no stdout to keep clean
            saved = None
        try:
            if saved is not None:
                with open(os.devnull, "w") as devnull:
                    os.dup2(devnull.fileno(), 1)
            yield
        finally:
            if saved is not None:
                os.dup2(saved, 1)
                os.close(saved)
    # the tracer's own notes (a Python value taken from a tensor) are left to the check of the written file
    wrong = [
        str(w.message) for w in caught if "incorrect" in str(w.message) and not issubclass(w.category, TracerWarning)
    ]
    if wrong:
        raise _Refused(wrong[0].replace("Warning: ", ""))


def _torchscript(model: nn.Module, path, example, check, blob: str | None) -> torch.Tensor:
    # traced, not scripted: the layers compute with Python-side structure (cached indices, optional branches)
    # that torch.jit.script does not take; the trace keeps the batch dimension dynamic (checked on `check`)
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, path, _extra_files={META: blob} if blob else None)
            if isinstance(path, io.BytesIO):
                path.seek(0)
            return torch.jit.load(path)(check)
    except _Refused:
        raise
    except Exception as e:
        called = _python_function(e)
        if called:
            raise _Refused(
                f"it calls the Python autograd function {called}, which a TorchScript file cannot hold "
                "(try --format onnx)"
            ) from None
        raise _Refused(_brief(e)) from None


def _python_function(e: Exception) -> str | None:
    """The autograd.Function a TorchScript save failed on, if that is why it failed."""
    text = str(e)
    marker = "Could not export Python function call '"
    return text.split(marker, 1)[1].split("'", 1)[0] if marker in text else None


def _index_add_symbolic():
    """``aten::index_add`` as ScatterElements with reduction "add". torch's own mapping scatters without
    accumulating, so indices that repeat (StripeConv adds many stripes into one output channel) would be lost."""
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "i", "v", "v", "f")
    def index_add(g, self, dim, index, source, alpha=1.0):
        rank = self.type().dim()
        if rank is None:
            raise RuntimeError("index_add on a tensor of unknown rank")
        if alpha != 1:
            source = g.op("Mul", source, g.op("Constant", value_t=torch.tensor(alpha)))
        shape = [1] * rank
        shape[dim] = -1
        index = g.op("Reshape", index, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.long)))
        index = g.op("Expand", index, g.op("Shape", source))
        return g.op("ScatterElements", self, index, source, axis_i=dim, reduction_s="add")

    return index_add


def _onnx(model: nn.Module, path, example, check, blob: str | None):
    try:
        import onnx
    except ImportError:
        raise UserError(
            "--format", "onnx needs the export extra (onnx, onnxruntime): pip install 'prune-cli[export]'"
        ) from None
    torch.onnx.register_custom_op_symbolic("aten::index_add", _index_add_symbolic(), OPSET)
    try:
        with _quiet(), torch.no_grad():
            # dynamo=False: the TorchScript-based exporter. torch's default (dynamo) exporter needs the onnxscript
            # package, which is not part of the export extra; this one needs only onnx and exports every layer
            # kind here (the check below verifies each file).
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        proto = onnx.load_from_string(path.getvalue()) if isinstance(path, io.BytesIO) else onnx.load(str(path))
        if blob:
            entry = proto.metadata_props.add()
            entry.key, entry.value = META, blob
        proto.producer_name, proto.producer_version = "prune_cli", __version__
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
        if isinstance(path, io.BytesIO):
            path.seek(0)
            path.truncate()
            path.write(data)
        else:
            Path(path).write_bytes(data)
    except (_Refused, UserError):
        raise
    except Exception as e:
        raise _Refused(_brief(e)) from None
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::index_add", OPSET)
    try:
        import onnxruntime
    except ImportError:
        return None
    try:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": check.numpy()})[0])
    except Exception as e:
        raise _Refused(f"onnxruntime cannot run the file ({_brief(e)})") from None


def _culprit(model: nn.Module, fmt: str, example, check) -> str | None:
    """``Type (module name)`` of the smallest layer of the model's own code (not torch.nn's) that fails to export
    on the inputs it gets inside the model; None when each exports alone."""
    own = {name: m for name, m in model.named_modules() if name and not type(m).__module__.startswith("torch.")}
    seen: dict[str, list] = {name: [] for name in own}

    def hook(name):
        def record(module, args):
            if len(args) == 1 and isinstance(args[0], torch.Tensor):
                seen[name].append(args[0].detach().clone())

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in own.items()]
    try:
        with torch.no_grad():
            model(example), model(check)
    finally:
        for h in handles:
            h.remove()
    for name in sorted(own, key=lambda n: -n.count(".")):  # the deepest first: name the smallest failing layer
        inputs = seen[name]
        if len(inputs) != 2:
            continue
        try:
            _write(own[name], io.BytesIO(), fmt, inputs[0], inputs[1], None)
        except (_Refused, UserError):
            return f"{type(own[name]).__name__} ({name})"
    return None


def _shape(input_shape) -> str:
    return "x".join(str(s) for s in input_shape)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def embedded(path: str | os.PathLike) -> dict | None:
    """The metadata a prune_cli export carries (TorchScript or ONNX), or None for any other file."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith(f"/extra/{META}")), None)
                return json.loads(z.read(name)) if name else None
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return next((json.loads(p.value) for p in proto.metadata_props if p.key == META), None)
    except Exception:
        return None


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="prune-cli-export",
        description="Export the pruned model of a prune_cli run as TorchScript or ONNX.",
    )
    parser.add_argument("run", type=Path, help="a run directory (its last finished stage) or a checkpoint file")
    parser.add_argument("--format", default="torchscript", help="torchscript (model.pt, default) or onnx (model.onnx)")
    parser.add_argument("--stage", default=None, help="export this stage's checkpoint instead of the last finished one")
    parser.add_argument("--output", type=Path, default=None, help="where to write (default: inside the run directory)")
    parser.add_argument("--input-shape", default=None, help="C,H,W when the run's config does not tell it")
    parser.add_argument("--force", action="store_true", help="overwrite an output that holds another run's export")
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
        print(f"error: {_brief(e)}", file=sys.stderr)
        return 1


def _export_run(args) -> str:
    if args.format not in FORMATS:
        raise UserError("--format", f"unknown format {args.format!r}; choose {' or '.join(FORMATS)}")
    shape = _parse_shape(args.input_shape) if args.input_shape else None
    model, meta = load(args.run, args.stage)
    shape = shape or meta["input_shape"]
    if shape is None:
        raise UserError("--input-shape", "the run's config does not tell the input shape; give it as C,H,W")
    if args.input_shape:
        from .measure import count_macs

        meta = {**meta, "input_shape": shape, "macs": count_macs(model, shape)}
    out = args.output or _default_output(meta, args.format)
    if out.is_dir():
        out = out / f"model{FORMATS[args.format]}"
    _check_output(out, meta, args.force)
    source = meta["run_dir"] or meta["checkpoint"]
    embed = {k: meta[k] for k in ("stage", "params", "macs", "input_shape", "dataset", "mean", "std", "results")}
    embed |= {"source": str(Path(source).resolve()), "arch": meta["arch"], "config": meta["config"]}
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
