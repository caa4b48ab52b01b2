"""trainer.memory_format and trainer.compile change speed, not results; auto trains channels_last on the CPU, a
resumed run keeps the layout it began with (a run recorded contiguous stays contiguous) and a compiled one resumes
to the uninterrupted table."""

import json

import pandas as pd
import pytest
import torch

from helpers import TINY, results_table, run_interrupted
from helpers import compose_config as config
from prune_cli.core.errors import UserError
from prune_cli.engine.settings import resolve_memory_format
from prune_cli.run import pipeline
from prune_cli.run import provenance as provenance_module


def fast(*overrides):
    return config(*TINY, "schedule.pretrain.epochs=2", "schedule.finetune.epochs=1", *overrides)


@pytest.mark.slow
def test_channels_last_gives_the_contiguous_table_to_float_noise(tmp_path):
    # a small lr: at the default one, two epochs on random labels are chaotic and amplify the layouts' rounding
    # (8x8 images: the layouts differ at any size, on a quarter of the pixels)
    calm = ["schedule.pretrain.lr=0.001", "schedule.finetune.lr=0.001", "dataset.image_size=8"]
    for fmt in ("contiguous", "channels_last"):
        pipeline.run(fast(f"trainer.memory_format={fmt}", *calm), tmp_path / fmt)
        assert json.loads((tmp_path / fmt / "run.json").read_text())["memory_format"] == fmt
    a, b = (pd.read_csv(tmp_path / fmt / "results.csv") for fmt in ("contiguous", "channels_last"))
    assert list(a["top1"]) == list(b["top1"]) and list(a["params"]) == list(b["params"])
    assert list(a["stage"]) == list(b["stage"])
    # two epochs amplify the layouts' rounding to 1.0e-4 of the loss on AVX2 kernels (less on AVX-512)
    pd.testing.assert_series_equal(a["loss"], b["loss"], rtol=5e-4)


@pytest.mark.slow
def test_a_new_cpu_run_trains_channels_last_by_default_and_resumes_to_the_uninterrupted_table(tmp_path, monkeypatch):
    cfg = fast("dataset.image_size=8")  # trainer.memory_format=auto; any size resumes alike
    pipeline.run(cfg, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "run.json").read_text())["memory_format"] == "channels_last"
    run_interrupted(cfg, tmp_path / "b", monkeypatch, at_epoch=2)  # the second pretrain epoch
    half = torch.load(tmp_path / "b" / "checkpoints" / "pretrain.pt", weights_only=True)
    assert half["provenance"]["memory_format"] == "channels_last" and not half["done"]
    conv = next(t for t in half["state_dict"].values() if t.ndim == 4 and t.shape[2] > 1 and t.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # it really trained in channels_last
    pipeline.run(cfg, tmp_path / "b")
    assert results_table(tmp_path / "a") == results_table(tmp_path / "b")


@pytest.mark.slow
def test_a_run_recorded_contiguous_resumes_contiguous_under_auto(tmp_path, monkeypatch):
    """A run that an earlier version began under auto on the CPU (recorded contiguous) keeps training contiguous:
    resumed, it gives the uninterrupted contiguous run's table bit for bit."""
    cfg = fast("dataset.image_size=8")
    pipeline.run(fast("trainer.memory_format=contiguous", "dataset.image_size=8"), tmp_path / "a")

    def earlier_rule(name, device, recorded=None):  # auto meant contiguous on the CPU before channels_last
        return "contiguous" if name == "auto" else name

    with monkeypatch.context() as m:
        m.setattr(provenance_module, "resolve_memory_format", earlier_rule)
        run_interrupted(cfg, tmp_path / "b", monkeypatch, at_epoch=2)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["memory_format"] == "contiguous"
    pipeline.run(cfg, tmp_path / "b")  # today's rule: auto keeps the recorded format
    assert json.loads((tmp_path / "b" / "run.json").read_text())["memory_format"] == "contiguous"
    assert results_table(tmp_path / "a") == results_table(tmp_path / "b")


def test_auto_keeps_the_recorded_format_of_a_resumed_run():
    cpu = torch.device("cpu")
    assert resolve_memory_format("auto", torch.device("cuda")) == "channels_last"
    assert resolve_memory_format("auto", cpu) == "channels_last"
    assert resolve_memory_format("auto", torch.device("mps")) == "contiguous"
    assert resolve_memory_format("auto", cpu, {"memory_format": "contiguous"}) == "contiguous"
    assert resolve_memory_format("auto", cpu, {"memory_format": "channels_last"}) == "channels_last"
    assert resolve_memory_format("auto", cpu, {}) == "contiguous"  # recorded before the option existed
    assert resolve_memory_format("contiguous", cpu) == "contiguous"


def test_a_bad_memory_format_is_refused(tmp_path):
    with pytest.raises(UserError) as e:
        pipeline.run(fast("trainer.memory_format=nhwc"), tmp_path)
    assert e.value.option == "trainer.memory_format" and "channels_last" in e.value.why


@pytest.mark.slow
def test_compiled_training_resumes_to_the_uncompiled_table(tiny_run, tmp_path, monkeypatch):
    """torch.compile (its eager backend here: tracing without code generation, seconds instead of a minute) gives
    the eager table; checkpoints hold the plain module's weights; an interrupted compiled run resumes to it."""
    compiled = ["trainer.compile=true", "trainer.compile_backend=eager"]
    _, plain, _ = tiny_run  # fast() without compiling: the run this session's tests share
    run_interrupted(fast(*compiled), tmp_path / "b", monkeypatch, at_epoch=2)
    half = torch.load(tmp_path / "b" / "checkpoints" / "pretrain.pt", weights_only=True)
    assert not any("_orig_mod" in key for key in half["state_dict"])
    pipeline.run(fast(*compiled), tmp_path / "b")
    assert results_table(plain) == results_table(tmp_path / "b")
    metrics = pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert (metrics.groupby("stage")["compile_seconds"].first() > 0).all()  # each stage compiles in its first epoch


def test_sync_bn_needs_cuda(tmp_path):
    with pytest.raises(UserError) as e:
        pipeline.run(fast("trainer.sync_bn=true", "trainer.device=cpu"), tmp_path)
    assert e.value.option == "trainer.sync_bn"
