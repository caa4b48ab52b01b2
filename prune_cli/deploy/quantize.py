"""INT8 deployment: ONNX Runtime's static quantization of an exported model, and the report that compares it with
the fp32 model it came from.

``quantize`` takes the fp32 ONNX file ``export`` wrote and checked, calibrates activation ranges (min-max) on
training images of the run's own dataset, normalised as in training, and writes the QDQ form (per-channel int8
weights, 7-bit on an x86 CPU without VNNI: ``weight_bits``; uint8 activations), which ONNX Runtime runs as integer
kernels. Layer kinds with weights that ONNX Runtime does not quantize stay float and are named. ``report`` measures
both models on the run's test split (top-1) and times them at batch 1 and at the run's eval batch on this machine's
CPU.
"""

from __future__ import annotations

import io
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from prune_cli.core.atomic import write_bytes
from prune_cli.core.errors import UserError, one_line
from prune_cli.core.timing import time_calls
from prune_cli.data import batches, load_data, normalize
from prune_cli.deploy.export import export

QUANTIZE = ("int8",)
CALIBRATION_IMAGES = 256  # training images the activation ranges are calibrated on (drawn with the run's seed)
TIMING = {"warmup": 3, "repeats": 15}  # forwards per model and batch: untimed, then timed (the median is reported)


def run_data(config: dict):
    """The run's dataset on the CPU as its config names it; one line (``--quantize``: why) when it cannot be read."""
    try:
        return load_data(OmegaConf.create(config["dataset"]), config.get("seed", 0), "cpu")
    except UserError as e:
        raise UserError("--quantize", f"calibrating needs the run's dataset: {e}") from None
    except Exception as e:
        raise UserError(
            "--quantize", f"calibrating needs the run's dataset, which does not load ({one_line(e)})"
        ) from None


def calibration_images(data, seed: int, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """``n`` training images (at most all of them), drawn with ``seed``, normalised as the network saw them."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[: min(n, len(data.train))]
    return normalize(data.train.take(idx), data).numpy().astype(np.float32)


class _Images:
    """ONNX Runtime's calibration reader: the images in batches of 32, as the model's ``input``."""

    def __init__(self, images: np.ndarray, batch: int = 32):
        self.batches = iter([{"input": images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def weight_bits(machine: str | None = None, cpuinfo: str | None = None) -> int:
    """8, or 7 where int8 weights must keep to 7 bits (ONNX Runtime's ``reduce_range``): on an x86 CPU without VNNI
    its uint8 x int8 kernels add pairs of products in 16 bits (AVX2's ``vpmaddubsw``), which saturate with
    full-range weights. Measured on an AVX2 CPU: the digits demo's pruned ResNet-20 went from 98.05 top-1 to 96.94
    with 8-bit weights, to 98.05 with 7-bit ones (in the test suite's run, 98.61 to 96.38 with 8 bits). VNNI is
    read from ``/proc/cpuinfo``; an x86 CPU whose flags cannot be read gets 7 bits (``machine`` and ``cpuinfo``
    stand in for this machine's, in tests)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return 8
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return 7
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return 8 if {"avx512_vnni", "avx_vnni"} & set(flags) else 7


def quantize(fp32: bytes, images: np.ndarray, bits: int = 8) -> tuple[bytes, list[str]]:
    """(the INT8 model, the op kinds with weights left in float) of the fp32 ONNX model ``fp32``, its weights
    ``bits`` wide (``weight_bits``)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        source, ready, out = (Path(tmp) / name for name in ("fp32.onnx", "ready.onnx", "int8.onnx"))
        source.write_bytes(fp32)
        try:
            quant_pre_process(str(source), str(ready), skip_symbolic_shape=True)
            quantize_static(
                str(ready),
                str(out),
                _Images(images),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                reduce_range=bits == 7,
            )
        except Exception as e:
            raise UserError("--quantize", f"ONNX Runtime cannot quantize the model ({one_line(e)})") from None
        graph = onnx.load(str(ready)).graph
        weights = {t.name for t in graph.initializer if len(t.dims) >= 2}
        left = sorted({n.op_type for n in graph.node if set(n.input) & weights and n.op_type not in QDQRegistry})
        return out.read_bytes(), left


def session(model: bytes, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def report(models: dict[str, bytes], data, eval_batch: int, threads: int) -> dict:
    """Per model: test top-1 (%) on the run's test split, and the median latency (ms) of one forward at batch 1
    and at ``eval_batch``, the models timed interleaved."""
    sessions = {name: session(model, threads) for name, model in models.items()}
    correct, seen = dict.fromkeys(sessions, 0), 0
    for x, y in batches(data.test, data, eval_batch):
        for name, s in sessions.items():
            correct[name] += int((s.run(None, {"input": x.numpy()})[0].argmax(1) == y.numpy()).sum())
        seen += len(y)
    x, _ = next(iter(batches(data.test, data, eval_batch)))
    timed = latencies(sessions, x.numpy(), sorted({1, min(eval_batch, len(x))}))
    return {name: {"top1": 100.0 * correct[name] / seen, **timed[name]} for name in sessions}


def latencies(sessions: dict, x: np.ndarray, sizes: list[int]) -> dict[str, dict[str, float]]:
    """Per session, the median latency (ms) of one forward of the first ``size`` images of ``x`` for each of
    ``sizes`` (``latency_ms_b<size>``), the sessions timed interleaved."""
    out = {name: {} for name in sessions}
    for size in sizes:
        feed = {"input": np.ascontiguousarray(x[:size])}
        calls = [lambda s=s, feed=feed: s.run(None, feed) for s in sessions.values()]
        for name, (median, _) in zip(sessions, time_calls(calls, torch.device("cpu"), **TIMING)):
            out[name][f"latency_ms_b{size}"] = round(median, 4)
    return out


def fp32_bytes(write) -> bytes:
    """The file ``write(path)`` makes, read back (``export`` writes to paths only)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        write(path)
        return path.read_bytes()


def with_metadata(model: bytes, source: bytes) -> bytes:
    """``model`` carrying the metadata (``prune_cli.json``) of the export ``source`` it was made from."""
    import onnx

    proto, origin = onnx.load_from_string(model), onnx.load_from_string(source)
    del proto.metadata_props[:]
    proto.metadata_props.extend(origin.metadata_props)
    buffer = io.BytesIO()
    onnx.save(proto, buffer)
    return buffer.getvalue()


def export_int8(model, out: Path, input_shape, metadata: dict, config: dict | None) -> tuple[dict, list[str]]:
    """Write ``model`` quantized to INT8 at ``out`` (ONNX, with ``metadata``), calibrated on its run's training
    images (``config``: the run's); returns (the weights' ``weight_bits`` and the report of ``report`` for fp32 and
    int8, the float-left op kinds)."""
    if not config or "dataset" not in config:
        raise UserError("--quantize", "calibrating needs the run's dataset, and the checkpoint records no config")
    data = run_data(config)
    fp32 = fp32_bytes(lambda path: export(model, path, "onnx", input_shape, metadata=metadata))
    bits = weight_bits()
    int8, left = quantize(fp32, calibration_images(data, config.get("seed", 0)), bits)
    try:
        write_bytes(out, with_metadata(int8, fp32))
    except OSError as e:
        raise UserError("--output", f"cannot write {out} ({e.strerror or type(e).__name__})") from None
    eval_batch = (config.get("trainer") or {}).get("eval_batch_size", 256)
    return {
        "weight_bits": bits,
        **report({"fp32": fp32, "int8": int8}, data, eval_batch, torch.get_num_threads()),
    }, left
