"""Whole runs through the real config (Hydra's compose API): tables, checkpoints, resume, init_from, budgets."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import fakedata
from helpers import TINY, run_interrupted
from helpers import compose_config as config
from prune_cli.core.errors import UserError
from prune_cli.engine import loop
from prune_cli.run import pipeline
from prune_cli.stages.prune import zero_groups


def fast(*overrides):
    return config(*TINY, "schedule.pretrain.epochs=2", "schedule.finetune.epochs=1", *overrides)


@pytest.mark.slow
def test_default_run_writes_every_table(tiny_run):
    _, run_dir, rows = tiny_run  # fast(): the run this session's tests share
    results = pd.read_csv(run_dir / "results.csv")
    assert list(results["stage"]) == ["init", "pretrain", "prune", "finetune"]
    for col in [
        "stage",
        "top1",
        "best_top1",
        "loss",
        "params",
        "macs",
        "epochs",
        "seconds",
        "model",
        "dataset",
        "regularizer",
        "criterion",
        "target",
        "ratio",
        "seed",
    ]:
        assert col in results.columns
    # the prune stage removed half of the params (within one channel's granularity)
    dense, pruned = results.iloc[1], results.iloc[2]
    assert abs(1 - pruned["params"] / dense["params"] - 0.5) < 0.01
    assert results.iloc[-1]["params"] == pruned["params"]
    assert results.iloc[1]["epochs"] == 2 and results.iloc[-1]["epochs"] == 1
    trained = results.iloc[1:]
    assert (trained["best_top1"] >= trained["top1"] - 1e-9).all()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(zip(metrics["stage"], metrics["epoch"])) == [("pretrain", 1), ("pretrain", 2), ("finetune", 1)]
    assert metrics.iloc[-1]["test_acc"] == results.iloc[-1]["top1"]
    layers = pd.read_csv(run_dir / "layers.csv")
    assert len(layers) == 9 and (layers["after"] <= layers["before"]).all() and (layers["after"] >= 1).all()
    scores = pd.read_csv(run_dir / "scores.csv")
    assert len(scores) == layers["before"].sum() and scores["kept"].sum() == layers["after"].sum()
    summary = (run_dir / "summary.md").read_text()
    assert "| stage |" in summary and "dense -> pruned" in summary
    ck = torch.load(run_dir / "checkpoints" / "finetune.pt", weights_only=True)
    assert ck["done"] and ck["arch"]["widths"] == list(layers["after"])
    assert set(ck) >= {"config", "stage", "arch", "state_dict", "optimizer", "epoch", "rows"}
    assert rows[-1]["params"] == pruned["params"]


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_table(tmp_path, monkeypatch):
    cfg = fast("schedule.pretrain.epochs=3", "schedule.finetune.epochs=2", "dataset.image_size=8")  # 5 epochs, twice
    full = pd.read_csv(Path(tmp_path / "a") / "results.csv") if pipeline.run(cfg, tmp_path / "a") else None

    run_interrupted(cfg, tmp_path / "b", monkeypatch, at_epoch=5)  # the second finetune epoch
    assert not torch.load(tmp_path / "b" / "checkpoints" / "finetune.pt", weights_only=True)["done"]
    pipeline.run(cfg, tmp_path / "b")
    resumed = pd.read_csv(tmp_path / "b" / "results.csv")
    cols = ["stage", "top1", "best_top1", "loss", "params", "macs", "epochs"]
    pd.testing.assert_frame_equal(full[cols], resumed[cols])
    metrics = pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert len(metrics) == 5  # no epoch logged twice


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_refuses_other_configs(tiny_run, tmp_path, monkeypatch):
    cfg, finished, _ = tiny_run  # fast(), run once for the session: a copy of its directory is rerun
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "results.csv").read_text()
    monkeypatch.setattr(loop, "train_epoch", lambda *a, **k: pytest.fail("a finished stage ran again"))
    pipeline.run(cfg, tmp_path)  # the same config object: a run leaves it as it was given
    with pytest.raises(UserError, match="hydra.run.dir.*different config.*prune.ratio"):
        pipeline.run(fast("prune.ratio=0.3"), tmp_path)
    assert (tmp_path / "results.csv").read_text().split("\n")[:5] == before.split("\n")[:5]


@pytest.mark.slow
def test_init_from_skips_the_stages_it_covers(tmp_path, monkeypatch):
    pipeline.run(config(*TINY, "schedule=pretrain", "schedule.pretrain.epochs=1"), tmp_path / "pre")
    ckpt = tmp_path / "pre" / "checkpoints" / "pretrain.pt"
    cfg = fast(f"init_from={ckpt}", "prune.ratio=0.3", "prune.target=macs")
    pipeline.run(cfg, tmp_path / "sweep")
    results = pd.read_csv(tmp_path / "sweep" / "results.csv")
    pre = pd.read_csv(tmp_path / "pre" / "results.csv")
    assert list(results["stage"]) == ["init", "pretrain", "prune", "finetune"]
    assert results.iloc[1]["top1"] == pre.iloc[1]["top1"]  # pretrain taken over, not rerun
    assert abs(1 - results.iloc[2]["macs"] / results.iloc[1]["macs"] - 0.3) < 0.01


def test_measure_needs_no_data(tmp_path):
    rows = pipeline.run(
        config("schedule=measure", "model=resnet56", "dataset=cifar10", "dataset.root=/nonexistent"), tmp_path
    )
    assert len(rows) == 1 and rows[0]["params"] == 853_018 and rows[0]["macs"] == 125_485_696


@pytest.mark.slow
def test_scratch_reinitialises_and_budget_b_scales_epochs(tmp_path):
    cfg = config(
        *TINY,
        "schedule=scratch",
        "schedule.pretrain.epochs=1",
        "schedule.scratch.epochs=2",
        "schedule.scratch.budget=B",
        "prune.target=macs",
        "prune.ratio=0.5",
        "dataset.image_size=8",  # the budget is the MACs' ratio, whatever the image size
    )
    pipeline.run(cfg, tmp_path)
    results = pd.read_csv(tmp_path / "results.csv")
    scratch = results.iloc[-1]
    assert scratch["stage"] == "scratch"
    assert scratch["epochs"] == round(2 * results.iloc[0]["macs"] / scratch["macs"])  # ~4 at half the MACs
    assert scratch["epochs"] >= 3


@pytest.mark.parametrize(
    "override,option",
    [
        ("prune.ratio=1.5", "prune.ratio"),
        ("schedule.pretrain.epochs=-1", "schedule.pretrain.epochs"),
        ("trainer.device=tpu", "trainer.device"),
        ("schedule.stages=[pretrain,sleep]", "schedule.stages"),
        ("dataset.subset=0", "dataset.subset"),
        ("model.width_mult=0", "model.width_mult"),
    ],
)
def test_bad_values_fail_before_training(tmp_path, override, option, monkeypatch):
    monkeypatch.setattr(loop, "train_epoch", lambda *a, **k: pytest.fail("trained despite a bad option"))
    with pytest.raises(UserError) as err:
        pipeline.run(fast(override), tmp_path)
    assert err.value.option == option


@pytest.mark.slow
def test_real_cifar_format_through_the_pipeline(tmp_path):
    fakedata.make_cifar10(tmp_path / "data", n_train=100, n_test=80)
    cfg = config(
        "dataset=cifar10",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.check_md5=false",
        "debug=smoke",
        "trainer.progress=false",
        "model=vgg11",
        "model.width_mult=0.25",  # the files' format is the point: a quarter of VGG-11's channels reads them alike
    )
    rows = pipeline.run(cfg, tmp_path / "run")
    assert [r["stage"] for r in rows] == ["init", "pretrain", "prune", "finetune"]
    assert rows[-1]["params"] < rows[0]["params"]


@pytest.mark.slow
def test_gates_stage_prunes_to_the_macs_target_against_the_standard_model(tmp_path):
    cfg = config(
        *TINY,
        "schedule=pfs",
        "schedule.gates.epochs=2",
        "schedule.scratch.epochs=1",
        "dataset.val_split=16",
        "model=vgg11",
        "model.width_mult=1.25",
        "prune.target=macs",
        "prune.ratio=0.5",
    )
    rows = pipeline.run(cfg, tmp_path)
    assert [r["stage"] for r in rows] == ["init", "gates", "scratch"]
    standard = config(*TINY, "schedule=measure", "model=vgg11")
    reference = pipeline.run(standard, tmp_path / "ref")[0]["macs"]
    assert abs(1 - rows[1]["macs"] / reference - 0.5) <= 1e-3 * 0.5  # measured against the unexpanded model
    assert rows[-1]["macs"] == rows[1]["macs"]
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    gates = metrics[metrics["stage"] == "gates"]
    assert len(gates) == 2 and gates["density"].between(0, 1).all() and gates["val_acc"].notna().all()


@pytest.mark.slow
def test_grafting_trains_two_networks_and_reports_both(tmp_path):
    cfg = config(
        "dataset=digits",
        "dataset.subset=200",
        "dataset.test_subset=100",
        "trainer.progress=false",
        "schedule=pretrain",
        "schedule.pretrain.epochs=2",
        "schedule.pretrain.graft.variant=external",
    )
    rows = pipeline.run(cfg, tmp_path)
    row = rows[-1]
    assert {"top1_net0", "top1_net1", "continued"} <= set(row)
    assert row["top1"] == max(row["top1_net0"], row["top1_net1"])
    assert row["top1"] == row[f"top1_net{row['continued']}"]
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert sorted(zip(metrics["epoch"], metrics["net"])) == [(1, 0), (1, 1), (2, 0), (2, 1)]


@pytest.mark.slow
def test_slimming_threshold_removes_exactly_the_requested_share(tmp_path):
    cfg = config(
        *TINY,
        "schedule=sparse_finetune",
        "schedule.sparse_train.epochs=1",
        "schedule.finetune.epochs=1",
        "regularizer=bn_l1",
        "criterion=bn_scale",
        "criterion.rule=slimming",
        "prune.target=channels",
        "prune.ratio=0.3",
        "prune.scope=global",
        "model=vgg11",
    )
    pipeline.run(cfg, tmp_path)
    layers = pd.read_csv(tmp_path / "layers.csv")
    # Network Slimming's code prunes int(total * percent) channels
    assert layers["before"].sum() - layers["after"].sum() == int(0.3 * layers["before"].sum())
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert scores[~scores["kept"]]["score"].max() <= scores[scores["kept"]]["score"].min()  # one global |gamma| cut
    results = pd.read_csv(tmp_path / "results.csv").set_index("stage")
    sparse = results.loc["sparse_train"]
    assert 0 <= sparse["weight_sparsity"] <= 1 and "feature_group_sparsity" in results.columns
    sparsity = pd.read_csv(tmp_path / "sparsity.csv")
    assert len(sparsity) == 8 + 1  # every conv and the linear head
    assert {"zero_filters", "zero_feature_groups"} <= set(layers.columns)


def test_zero_groups_counts_zeroed_consumer_kernels():
    from prune_cli.models import build_model

    model = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3})
    group = model.channel_groups()[0]
    with torch.no_grad():
        model.get_submodule(group.consumers[0]).weight[:, :4] = 0
    stats = zero_groups(model, group)
    assert stats == {"zero_filters": 0.0, "zero_feature_groups": 4 / 16}


@pytest.mark.slow
def test_iterative_pruning_reaches_the_target_in_steps(tmp_path):
    cfg = fast("prune.steps=3", "prune.step_epochs=1", "prune.target=macs", "prune.ratio=0.6")
    rows = pipeline.run(cfg, tmp_path)
    dense, pruned = rows[1], rows[2]
    assert abs(1 - pruned["macs"] / dense["macs"] - 0.6) < 0.01  # the cumulative target, of the dense model
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics["stage"]).count("prune_step1") == 1 and list(metrics["stage"]).count("prune_step2") == 1
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert list(layers["before"]) == [16] * 3 + [32] * 3 + [64] * 3  # dense widths, not the last step's


def test_init_from_a_file_that_is_no_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello")
    with pytest.raises(UserError) as err:
        pipeline.run(fast(f"init_from={bad}"), tmp_path / "run")
    assert err.value.option == "init_from"


@pytest.mark.slow
def test_loss_criterion_in_the_prune_stage(tmp_path):
    cfg = fast(
        "criterion=loss",
        "criterion.num_images=16",
        "dataset.image_size=8",  # the greedy's forwards on a quarter of the pixels: the same channels to choose from
        "prune.target=params",
        "prune.ratio=0.3",
        "schedule.finetune.epochs=0",
    )
    rows = pipeline.run(cfg, tmp_path)
    prune = rows[2]
    assert abs(1 - prune["params"] / rows[1]["params"] - 0.3) < 0.005
    assert prune["selection_forward_passes"] > 0 and prune["selection_exact_passes_estimate"] > 0
    scores = pd.read_csv(tmp_path / "scores.csv")
    removed = scores[~scores["kept"]]["score"]
    assert sorted(removed) == list(range(len(removed)))  # the greedy's removal order
    assert (scores[scores["kept"]]["score"] == len(removed)).all()
