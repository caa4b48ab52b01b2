"""scripts/bench_gpu.py: the CPU dry run (no CUDA here) prints the table, the epoch / schedule times and says that
the GPU figures need a GPU; a torch.compile that fails is reported as skipped, not a crash."""

import importlib.util

import pytest
import torch

from helpers import ROOT

TINY_ARGS = ["--device", "cpu", "--steps", "1", "--warmup", "1", "--batch", "2", "--width-mult", "0.125"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_dry_run_table(bench, capsys):
    rows = bench.main([*TINY_ARGS, "--precision", "fp32", "bf16", "--no-compile"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert header.split() == ["model", "variant", "train", "img/s", "eval", "img/s", "compile", "s"]
    table = [line.split() for line in lines if line.startswith(("resnet56 ", "vgg16 "))]
    variants = [f"{p}/{m}/eager" for p in ("fp32", "bf16") for m in ("contiguous", "channels_last")]
    assert [(r[0], r[1]) for r in table] == [(m, v) for m in ("resnet56", "vgg16") for v in variants]
    for r in table:
        assert len(r) == 5 and float(r[2]) > 0 and float(r[3]) > 0 and r[4] == "-"
    assert [(r["model"], r["variant"]) for r in rows] == [(r[0], r[1]) for r in table]
    epochs = bench.hgsr_epochs()
    assert set(epochs) == {"pretrain", "sparse_train", "scratch"}
    assert f"= {sum(epochs.values())} epochs" in out
    assert "resnet56: one CIFAR-10 epoch" in out and "vgg16: one CIFAR-10 epoch" in out
    assert "not GPU estimates" in out
    assert lines[-1] == bench.NEEDS_GPU and "GPU figures need a GPU" in lines[-1]


def test_failed_compile_is_skipped(bench, capsys, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", no_compiler)
    rows = bench.main([*TINY_ARGS, "--models", "resnet56", "--precision", "fp32", "--memory-format", "contiguous"])
    out = capsys.readouterr().out
    assert "resnet56  fp32/contiguous/compile" in out
    assert "skipped: RuntimeError: InvalidCxxCompiler: No working C++ compiler found" in out
    assert "more detail" not in out
    assert [r["variant"] for r in rows] == ["fp32/contiguous/eager", "fp32/contiguous/compile"]
    assert "skipped" in rows[1] and "train" in rows[0]
    assert out.splitlines()[-1] == bench.NEEDS_GPU
