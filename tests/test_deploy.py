"""Deployable models: TorchScript's and onnxruntime's outputs equal PyTorch's (1e-4) on pruned ResNets (options A
and B, a block reduced to its shortcut, scattered branch outputs), a pruned VGG and every layer kind methods put
into models; ``load`` from a run directory and from a checkpoint; the exporter's refusals and ``prune-cli-export``'s
one-line errors."""

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import onnxruntime
import pytest
import torch
from torch import nn

from helpers import TINY, calibrated, compose_config
from prune_cli import load
from prune_cli.cli import export as export_cli
from prune_cli.core.errors import UserError
from prune_cli.deploy import export as deploy
from prune_cli.deploy.quantize import weight_bits
from prune_cli.models import build_model
from prune_cli.models.layers import GatherConv, GatherLinear, StripeConv, convert, stripe_positions
from prune_cli.run import lock, pipeline
from prune_cli.structure.channels import prune_channels

SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run: pretrain, prune (half the params, L1), finetune."""
    path = tmp_path_factory.mktemp("run")
    extra = [
        "dataset.image_size=8",
        "model.width_mult=0.25",
        "schedule.pretrain.epochs=1",
        "schedule.finetune.epochs=1",
    ]
    pipeline.run(compose_config(*TINY, *extra), path)
    lock.release(path)
    return path


def pruned(name, seed=0, empty=None, **arch):
    """A tiny model with realistic BN statistics, 60% of every group's channels kept at random (group ``empty``:
    none, a block reduced to its shortcut)."""
    model = build_model({"name": name, "num_classes": 5, "in_channels": 3, "width_mult": 0.25, **arch})
    model = calibrated(model, SHAPE, seed)
    g = torch.Generator().manual_seed(seed)
    keep = [torch.rand(w, generator=g) < 0.6 for w in model.widths]
    for k in keep:
        k[0] = True
    if empty is not None:
        keep[empty][:] = False
    return calibrated(prune_channels(model, keep), SHAPE, seed)


def with_stripes():
    model = pruned("vgg11", seed=1)
    g = torch.Generator().manual_seed(1)
    spec = {}
    for name in ("features.4", "features.8"):
        mask = torch.rand(model.get_submodule(name).out_channels, 3, 3, generator=g) < 0.4
        mask[0] = False  # a filter without stripes
        spec[name] = stripe_positions(mask)
    convert(model, "stripes", spec)
    assert isinstance(model.features[4], StripeConv)
    return model.eval()


def with_gathers():
    model = pruned("resnet20", seed=2, shortcut="B")
    stream = model.layers[1][1].conv1.in_channels
    convert(
        model, "gather", {"layers.1.1.conv1": list(range(0, stream, 2)), "fc": list(range(1, model.fc.in_features, 3))}
    )
    assert isinstance(model.layers[1][1].conv1, GatherConv) and isinstance(model.fc, GatherLinear)
    return model.eval()


def with_factors():
    """Training forms (SWP's skeletons, RMNet's factors): folded into the weights by the exporter."""
    model = pruned("vgg11", seed=3)
    convert(model, "skeleton", ["features.0", "features.4"])
    convert(model, "factors", ["features.1", "features.5"])
    with torch.no_grad():
        model.features[0].skeleton.uniform_(0.5, 1.5)
        model.features[5].factor.uniform_(0.5, 1.5)
    return model.eval()


def with_gates():
    from prune_cli.methods.channel_gating import GatedConv  # channel gating's layer kind

    model = pruned("vgg11", seed=4)
    entry = {"p": 2, "group": False, "alpha": 2.0, "sparse_bp": True, "init": 0.0}
    convert(model, "gated", {"features.4": entry, "features.8": entry})
    assert isinstance(model.features[4], GatedConv)
    torch.manual_seed(4)  # the gates' own BatchNorms (no affine parameters) get statistics from a few batches
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *SHAPE))
    return model.eval()


def plain():
    """RMNet's result: a plain network with BatchNorm fused into the conv biases."""
    arch = {"name": "plain", "num_classes": 5, "in_channels": 3, "widths": [4, 6, 8], "strides": [1, 2, 1], "bn": False}
    return calibrated(build_model(arch), SHAPE, 5)


MODELS = {
    "resnet20_A_block_removed": lambda: pruned("resnet20", empty=1),
    "resnet20_B": lambda: pruned("resnet20", shortcut="B"),
    "resnet20_scattered_outputs": lambda: pruned("resnet20", prune_outputs=True),
    "vgg11_li_head": lambda: pruned("vgg11", head="li"),
    "vgg11_stripes": with_stripes,
    "resnet20_B_gathers": with_gathers,
    "vgg11_skeleton_factors": with_factors,
    "vgg11_gated": with_gates,
    "plain_fused": plain,
}


def run_file(path, fmt, x):
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still what TorchScript means
        return torch.jit.load(str(path))(x)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_exported_outputs_equal_pytorch(kind, fmt, tmp_path):
    model = MODELS[kind]()
    if kind == "resnet20_scattered_outputs":
        assert any(o is not None for o in model.arch["outputs"])  # conv2 adds into the stream by index
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(7))  # traced at batch 2: the batch is dynamic
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / f"model{deploy.FORMATS[fmt]}"
    deploy.export(model, path, fmt, SHAPE, metadata={"stage": kind})
    torch.testing.assert_close(run_file(path, fmt, x), expected, rtol=1e-4, atol=1e-4)
    assert deploy.embedded(path)["stage"] == kind
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


class Cumulative(nn.Module):
    def forward(self, x):
        return torch.cummax(x, 1)[0]  # no ONNX mapping


class Peek(nn.Module):
    def forward(self, x):
        return x * float(x.abs().max())  # a trace records the Python float as a constant


@pytest.mark.parametrize(
    "layer,fmt,why",
    [
        (Cumulative(), "onnx", "UnsupportedOperatorError: Exporting the operator 'aten::cummax' to ONNX"),
        (Peek(), "torchscript", "the written model's outputs differ from PyTorch's by "),
    ],
)
def test_a_layer_that_does_not_export_is_refused_in_one_line(layer, fmt, why, tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer, nn.Flatten(), nn.Linear(36 * 4, 2))
    with pytest.raises(UserError) as e:
        deploy.export(model, tmp_path / "m", fmt, SHAPE)
    message = str(e.value)
    assert message.startswith(f"--format: cannot export {type(layer).__name__} (1) as {fmt}: {why}"), message
    assert "\n" not in message and list(tmp_path.iterdir()) == []


def test_load_a_run_directory_and_a_checkpoint(run_dir):
    model, meta = load(run_dir)  # the last finished stage
    assert meta["stage"] == "finetune" and meta["status"] == "done" and not model.training
    assert meta["results"]["stage"] == "finetune" and meta["results"]["model"] == "resnet20"
    assert (meta["params"], meta["macs"]) == (meta["results"]["params"], meta["results"]["macs"])
    assert meta["input_shape"] == SHAPE and meta["dataset"] == "synthetic" and meta["mean"] is None
    assert meta["arch"]["widths"] == model.arch["widths"] and meta["config"]["seed"] == 0
    ck = torch.load(run_dir / "checkpoints" / "finetune.pt", weights_only=True)
    assert all(torch.equal(v, ck["state_dict"][k]) for k, v in model.state_dict().items())

    _, meta = load(run_dir / "checkpoints" / "pretrain.pt")
    assert meta["stage"] == "pretrain" and meta["run_dir"] == str(run_dir) and meta["results"]["stage"] == "pretrain"
    _, pruned_meta = load(run_dir, stage="prune")
    assert meta["params"] > pruned_meta["params"] == pruned_meta["results"]["params"]


def test_a_run_still_training_gives_its_last_finished_stage(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    lines = (copy / "results.csv").read_text().splitlines(keepends=True)
    (copy / "results.csv").write_text("".join(lines[:-1]))  # finetune has not finished: no row yet
    (copy / "status.json").write_text('{"status": "running", "error": ""}\n')
    _, meta = load(copy)
    assert meta["stage"] == "prune" and meta["status"] == "running"
    ck = torch.load(copy / "checkpoints" / "finetune.pt", weights_only=True)
    torch.save({**ck, "done": False, "epoch": 0}, tmp_path / "unfinished.pt")
    with pytest.raises(UserError, match="unfinished.pt is unfinished"):
        load(tmp_path / "unfinished.pt")


@pytest.mark.slow
def test_prune_cli_export_writes_a_verified_file(run_dir):
    """The command as a user runs it, in its own process: the run's last finished stage, TorchScript by default."""
    command = Path(sys.executable).parent / "prune-cli-export"  # the installed entry point
    r = subprocess.run([str(command), str(run_dir)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    out = run_dir / "model.pt"
    assert r.stdout.startswith(f"wrote {out} (torchscript; stage finetune of {run_dir}; params ")
    assert len(r.stdout.splitlines()) == 1 and "outputs equal PyTorch's" in r.stdout
    model, meta = load(run_dir)
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(run_file(out, "torchscript", x), model(x), rtol=1e-4, atol=1e-4)
    assert deploy.embedded(out)["params"] == meta["params"]
    # importing prune_cli (and so `load`) imports neither Hydra nor torch
    code = "import sys; from prune_cli import load; print(sorted({'hydra', 'torch'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "[]\n"


@pytest.mark.slow
def test_export_stage_and_output_rules(run_dir, tmp_path, capsys):
    assert export_cli.main([str(run_dir), "--stage", "prune", "--format", "onnx"]) == 0  # another stage: its own name
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {run_dir / 'model_prune.onnx'} (onnx opset 17; stage prune of {run_dir}; params ")
    model, _ = load(run_dir, stage="prune")
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(run_file(run_dir / "model_prune.onnx", "onnx", x), model(x), rtol=1e-4, atol=1e-4)
    assert deploy.embedded(run_dir / "model_prune.onnx")["stage"] == "prune"

    target = tmp_path / "exports" / "m.pt"
    assert export_cli.main([str(run_dir), "--output", str(target)]) == 0
    assert export_cli.main([str(run_dir), "--output", str(target)]) == 0  # the same run's export: written again
    other = tmp_path / "other.pt"  # a checkpoint outside its run directory: another source
    shutil.copy(run_dir / "checkpoints" / "prune.pt", other)
    capsys.readouterr()
    assert export_cli.main([str(other), "--output", str(target)]) == 2
    assert capsys.readouterr().err == (
        f"error: --output: {target} holds an export of another run ({run_dir.resolve()}); "
        "choose another path or pass --force\n"
    )
    assert export_cli.main([str(other), "--output", str(target), "--force"]) == 0
    assert deploy.embedded(target)["source"] == str(other.resolve())


@pytest.mark.parametrize(
    "args,message",
    [
        (["{tmp}/missing"], "error: run: {tmp}/missing does not exist"),
        (["{tmp}"], "error: run: {tmp} is not a run directory or a checkpoint (no checkpoints/)"),
        (["{tmp}/junk.pt"], "error: run: {tmp}/junk.pt is not a prune_cli checkpoint ("),
        (["{run}", "--format", "tflite"], "error: --format: unknown format 'tflite'; choose torchscript or onnx"),
        (
            ["{run}", "--stage", "sparse_train"],
            "error: --stage: {run} has no checkpoint of stage 'sparse_train'; it has pretrain, prune, finetune",
        ),
        (["{run}", "--input-shape", "3,8"], "error: --input-shape: expected C,H,W (three positive integers)"),
        (["{run}", "--output", "{tmp}/junk.pt"], "error: --output: {tmp}/junk.pt exists and is not a prune_cli export"),
        (["{run}", "--input-shape", "5,8,8"], "error: --input-shape: the model does not run on 5x8x8 inputs ("),
        (["{run}", "--output", "{tmp}/junk.pt/m.pt"], "error: --output: cannot write {tmp}/junk.pt/m.pt ("),
        (
            ["{run}", "--output", "{tmp}/m.onnx", "--format", "torchscript"],
            "error: --format: torchscript does not match --output {tmp}/m.onnx (its suffix .onnx means onnx)",
        ),
        ([], "error: prune-cli-export: the following arguments are required: run"),
        (
            ["{run}", "--quantize", "int8", "--format", "torchscript"],
            "error: --quantize: int8 models are ONNX files; drop --format torchscript or use onnx",
        ),
        (["{run}", "--quantize", "int4"], "error: prune-cli-export: argument --quantize: invalid choice: 'int4'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, run_dir, tmp_path, capsys):
    """Each refusal is one line naming the argument, exit 2, and writes nothing (no file, no temporary file)."""
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    fill = lambda s: s.format(tmp=tmp_path, run=run_dir)
    try:
        code = export_cli.main([fill(a) for a in args])
    except SystemExit as e:  # argparse's own errors leave through sys.exit, still one line
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith(fill(message)) and captured.err.count("\n") == 1, captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt"]
    assert (tmp_path / "junk.pt").read_text() == "not a checkpoint"


@pytest.mark.slow
def test_the_output_suffix_names_the_format(run_dir, tmp_path):
    assert export_cli.main([str(run_dir), "--output", str(tmp_path / "m.onnx")]) == 0
    assert deploy.embedded(tmp_path / "m.onnx")["format"] == "onnx"
    assert export_cli.main([str(run_dir), "--output", str(tmp_path / "m.bin")]) == 0
    assert deploy.embedded(tmp_path / "m.bin")["format"] == "torchscript"  # no suffix of a format: the default
    assert not list(tmp_path.glob(".*"))


@pytest.mark.slow
def test_an_int8_export_is_calibrated_measured_and_reported(run_dir, tmp_path, capsys):
    """The run's pruned model quantized (calibrated on its synthetic training images): an ONNX file of integer
    kernels carrying the run's metadata, and a report whose fp32 top-1 is the run's own test top-1."""
    import json

    import onnx
    import pandas as pd

    out = tmp_path / "m.onnx"
    assert export_cli.main([str(run_dir), "--quantize", "int8", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "test top-1 fp32" in printed
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert deploy.embedded(out)["quantize"] == "int8"
    report = json.loads((tmp_path / "m.report.json").read_text())
    final = pd.read_csv(run_dir / "results.csv").iloc[-1]
    assert report["fp32"]["top1"] == pytest.approx(final.top1, abs=1e-6)
    assert {"latency_ms_b1", "latency_ms_b48"} <= set(report["int8"])  # batch 1 and the eval batch (48)
    assert report["weight_bits"] == weight_bits() and f"per-channel {weight_bits()}-bit" in printed


@pytest.mark.parametrize(
    "machine, flags, bits",
    [
        ("x86_64", "fpu sse2 avx avx2 fma", 7),  # AVX2 alone: 16-bit pair sums saturate with 8-bit weights
        ("x86_64", "avx2 avx512f avx512bw avx512_vnni", 8),
        ("x86_64", "avx2 avx_vnni", 8),
        ("AMD64", "avx2", 7),
        ("aarch64", "fp asimd", 8),
    ],
)
def test_int8_weights_keep_to_7_bits_on_x86_without_vnni(machine, flags, bits):
    cpuinfo = f"processor\t: 0\nvendor_id\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert weight_bits(machine, cpuinfo) == bits


def test_layer_kinds_left_in_float_are_named():
    """A learnt per-channel scale (a Mul by a weight tensor, as ConvNeXt's layer scale) is not a kind ONNX Runtime
    quantizes: it is named; the convolution and linear layers are quantized."""
    from prune_cli.deploy.quantize import fp32_bytes, quantize

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.scale = nn.Conv2d(3, 4, 3), nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc((self.conv(x).relu() * self.scale).mean((2, 3)))  # (not folded into the conv)

    torch.manual_seed(0)
    fp32 = fp32_bytes(lambda path: deploy.export(Scaled().eval(), path, "onnx", SHAPE))
    _, left = quantize(fp32, torch.randn(8, *SHAPE).numpy())
    assert left == ["Mul"]
