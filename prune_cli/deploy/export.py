"""``export``: write a model as TorchScript or ONNX and check the file's outputs against PyTorch's.

Exports are traced on the CPU at the run's input shape with a dynamic batch dimension. The layer kinds methods put
into models export in both formats (docs, "Using a pruned model"); a model that does not export is refused in
one line naming its smallest layer that fails, and why. A written file
is read back and its outputs compared with PyTorch's on a random batch of another size before it replaces anything.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.jit import TracerWarning

from prune_cli.core.atomic import write_bytes
from prune_cli.core.errors import UserError, one_line
from prune_cli.core.version import __version__
from prune_cli.models.layers import fold

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}
# ONNX opset 17: ScatterElements with reduction="add" (opset >= 16) is what an index_add with repeated indices
# needs (see _index_add_symbolic); onnxruntime >= 1.17 (the export extra) runs it.
OPSET = 17
TOLERANCE = 1e-4  # rtol and atol (atol relative to the largest output) of the check of a written file
META = "prune_cli.json"  # the metadata every export carries: TorchScript extra file, ONNX metadata_props key


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
    ``logits``), with ``metadata`` embedded as JSON (``prune_cli.json``). The file is made in memory, read back
    and run on a random batch of another size; only if its outputs equal PyTorch's (rtol and atol 1e-4) is it
    written to ``path`` (atomically: a full disk is ``error: <path>: no space left on device``, an unwritable
    destination ``error: --output: cannot write <path> (<why>)``). Returns the largest difference (None: ONNX
    without onnxruntime to check it).
    A model that does not export is refused with ``UserError`` naming its first layer that fails and why.
    """
    if fmt not in FORMATS:
        raise UserError("--format", f"unknown format {fmt!r}; choose {' or '.join(FORMATS)}")

    model = fold(copy.deepcopy(model)).to("cpu", torch.float32).eval()
    input_shape = tuple(int(s) for s in input_shape)
    g = torch.Generator().manual_seed(0)
    example, check = torch.randn(2, *input_shape, generator=g), torch.randn(3, *input_shape, generator=g)
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:
        raise UserError(
            "--input-shape", f"the model does not run on {_shape(input_shape)} inputs ({one_line(e)})"
        ) from None
    blob = json.dumps({"prune_cli": __version__, "format": fmt, **(metadata or {})}, default=str)
    buffer = io.BytesIO()  # torch's file writers abort the process on a full disk: they write to memory only
    try:
        difference = _write(model, buffer, fmt, example, check, blob)
    except _Refused as e:
        culprit = _culprit(model, fmt, example, check)
        raise UserError("--format", f"cannot export {culprit or 'the model'} as {fmt}: {e}") from None
    try:
        write_bytes(path, buffer.getvalue())  # atomic: a failed write leaves no partial file
    except OSError as e:
        raise UserError("--output", f"cannot write {path} ({e.strerror or type(e).__name__})") from None
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
        raise _Refused(one_line(e)) from None


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
        raise _Refused(one_line(e)) from None
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
        raise _Refused(f"onnxruntime cannot run the file ({one_line(e)})") from None


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
