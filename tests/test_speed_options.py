"""trainer.memory_format and trainer.compile change speed, not results; a resumed run keeps the layout it began
with and a compiled one resumes to the uninterrupted table."""

import json

import pandas as pd
import pytest
import torch

from helpers import TINY, results_table, run_interrupted
from helpers import compose_config as config
from prune_cli.core.errors import UserError
from prune_cli.engine.settings import resolve_memory_format
from prune_cli.run import pipeline


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
def test_resume_under_channels_last_gives_the_uninterrupted_table(tmp_path, monkeypatch):
    cfg = fast("trainer.memory_format=channels_last", "dataset.image_size=8")  # any size resumes alike
    pipeline.run(cfg, tmp_path / "a")
    run_interrupted(cfg, tmp_path / "b", monkeypatch, at_epoch=2)  # the second pretrain epoch
    half = torch.load(tmp_path / "b" / "checkpoints" / "pretrain.pt", weights_only=True)
    assert half["provenance"]["memory_format"] == "channels_last" and not half["done"]
    conv = next(t for t in half["state_dict"].values() if t.ndim == 4 and t.shape[2] > 1 and t.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # it really trained in channels_last
    pipeline.run(cfg, tmp_path / "b")
    assert results_table(tmp_path / "a") == results_table(tmp_path / "b")


def test_auto_keeps_the_recorded_format_of_a_resumed_run():
    cpu = torch.device("cpu")
    assert resolve_memory_format("auto", torch.device("cuda")) == "channels_last"
    assert resolve_memory_format("auto", cpu) == "contiguous"
    assert resolve_memory_format("auto", torch.device("mps")) == "contiguous"
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
