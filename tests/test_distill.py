"""Knowledge distillation (``schedule.<stage>.distill``): the loss against a hand computation, a teacher left as
it was, the run's record of it, resume and torch.compile giving the uninterrupted eager table, and the teachers
refused in one line before any data is read."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

from helpers import TINY, compose_config, results_table, run_interrupted
from prune_cli.core.checkpoint import weights_digest
from prune_cli.core.errors import UserError
from prune_cli.data import load_data
from prune_cli.engine.distill import Distiller, kd_loss
from prune_cli.engine.loop import fit
from prune_cli.models import build_model
from prune_cli.run import pipeline

DISTILLED = ["schedule.finetune.distill.alpha=0.7", "schedule.finetune.distill.temperature=3.0"]


def tiny(*overrides):
    """A tiny synthetic pretrain, prune (half the params) and two finetune epochs."""
    return compose_config(*TINY, "schedule.pretrain.epochs=2", "schedule.finetune.epochs=2", *overrides)


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory):
    """One finished distilled run the module's tests read: its directory."""
    run_dir = tmp_path_factory.mktemp("distilled")
    pipeline.run(tiny(*DISTILLED), run_dir)
    return run_dir


def by_hand(student, teacher, y, alpha, t):
    """The loss written out: explicit sums over the classes of each image, then the batch mean."""
    total = 0.0
    for s_row, t_row, label in zip(student.tolist(), teacher.tolist(), y.tolist()):
        log_z = math.log(sum(math.exp(v) for v in s_row))
        ce = log_z - s_row[label]
        s_soft = [v / t for v in s_row]
        t_soft = [v / t for v in t_row]
        s_z = math.log(sum(math.exp(v) for v in s_soft))
        t_z = math.log(sum(math.exp(v) for v in t_soft))
        kl = sum(math.exp(tv - t_z) * ((tv - t_z) - (sv - s_z)) for sv, tv in zip(s_soft, t_soft))
        total += (1 - alpha) * ce + alpha * t * t * kl
    return total / len(y)


def test_the_loss_is_the_hand_computed_one():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 3
    y = torch.tensor([0, 3, 1, 1, 2])
    for alpha, t in [(0.0, 4.0), (1.0, 1.0), (1.0, 4.0), (0.3, 2.5), (0.9, 8.0)]:
        got = kd_loss(student.double(), teacher.double(), y, alpha, t).item()
        assert got == pytest.approx(by_hand(student, teacher, y, alpha, t), rel=1e-6), (alpha, t)
    plain = torch.nn.functional.cross_entropy(student, y)
    assert torch.equal(kd_loss(student, teacher, y, 0.0, 4.0), plain)  # alpha 0: the cross-entropy itself
    assert kd_loss(student, student, y, 1.0, 3.0).item() == pytest.approx(0.0, abs=1e-6)  # a perfect copy: no loss
    # T^2 scaling: at alpha 1 the loss is T^2 times the KL of the softened outputs
    soft = [(logits / 2).log_softmax(1) for logits in (student, teacher)]
    kl = torch.nn.functional.kl_div(*soft, reduction="batchmean", log_target=True)
    assert kd_loss(student, teacher, y, 1.0, 2.0).item() == pytest.approx(4 * kl.item(), rel=1e-6)


def test_the_teacher_is_never_updated():
    """A BatchNorm teacher (running statistics that training mode would move) after an epoch of distillation: its
    weights and buffers are the same, bit for bit, and the student learnt from it (a loss other than plain CE)."""
    cfg = compose_config(*TINY)
    data = load_data(cfg.dataset, 0, "cpu")
    arch = {"name": "resnet20", "num_classes": data.num_classes, "in_channels": 3, "width_mult": 0.25}
    torch.manual_seed(0)
    teacher, student = build_model(arch), build_model(arch)
    before = copy.deepcopy(teacher.state_dict())
    st = cfg.schedule.finetune
    runs = {}
    for alpha in (0.0, 0.5):
        net = copy.deepcopy(student)
        kd = Distiller(teacher, alpha, 2.0) if alpha else None
        runs[alpha] = fit([net], data, st, stage="finetune", epochs=1, seed=0, trainer=cfg.trainer, distill=kd)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics and num_batches_tracked included
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert runs[0.5][0]["train_loss"] != runs[0.0][0]["train_loss"]


@pytest.mark.slow
def test_the_run_records_its_teacher(distilled_run):
    """The finetune row names the dense model (the pretrain checkpoint) with the digest of its weights; the rows
    before it hold no distill columns; the pretrain checkpoint is as it was written."""
    rows = pd.read_csv(distilled_run / "results.csv")
    fine = rows[rows.stage == "finetune"].iloc[0]
    dense = torch.load(distilled_run / "checkpoints" / "pretrain.pt", weights_only=True)
    assert fine.distill_teacher == "dense checkpoints/pretrain.pt"  # in the run's own directory
    assert fine.distill_teacher_sha256 == weights_digest(dense["state_dict"])
    assert (fine.distill_alpha, fine.distill_temperature) == (0.7, 3.0)
    assert rows[rows.stage != "finetune"].distill_alpha.isna().all()
    assert "teacher" not in str(list(dense))  # the teacher is not stored in checkpoints


@pytest.mark.slow
def test_a_resumed_compiled_distilled_run_gives_the_uninterrupted_table(distilled_run, tmp_path, monkeypatch):
    """Interrupted in its second finetune epoch and run again (resumed from the first), with torch.compile's eager
    backend on the student and the teacher: the same table as the uninterrupted eager run."""
    compiled = ["trainer.compile=true", "trainer.compile_backend=eager"]
    run_interrupted(tiny(*DISTILLED, *compiled), tmp_path, monkeypatch, at_epoch=4)
    half = torch.load(tmp_path / "checkpoints" / "finetune.pt", weights_only=True)
    assert half["epoch"] == 1 and half["distill"]["distill_alpha"] == 0.7
    pipeline.run(tiny(*DISTILLED, *compiled), tmp_path)
    assert results_table(tmp_path) == results_table(distilled_run)


@pytest.mark.slow
def test_a_teacher_changed_under_a_resumed_run_is_refused(distilled_run, tmp_path):
    """A run interrupted in finetune whose teacher checkpoint was replaced since: one line, nothing trained."""
    import shutil

    shutil.copytree(distilled_run, tmp_path / "run")
    run = tmp_path / "run" / "checkpoints"
    ck = torch.load(run / "finetune.pt", weights_only=True)
    ck.update(done=False, epoch=1)
    torch.save(ck, run / "finetune.pt")
    dense = torch.load(run / "pretrain.pt", weights_only=True)
    dense["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in dense["state_dict"].items()}
    torch.save(dense, run / "pretrain.pt")
    with pytest.raises(UserError) as e:
        pipeline.run(tiny(*DISTILLED), tmp_path / "run")
    assert e.value.option == "schedule.finetune.distill.teacher" and "changed since" in e.value.why


def saved_teacher(path, **arch):
    """A prune_cli checkpoint of a random resnet20 of ``arch`` (classes, input channels)."""
    net = build_model({"name": "resnet20", "width_mult": 0.25, **arch})
    torch.save({"arch": net.arch, "state_dict": net.state_dict()}, path)
    return path


def refusal(tmp_path, *overrides) -> UserError:
    """The one-line refusal of a run with ``overrides``, before any data is read (the run directory holds no
    checkpoint: nothing trained)."""
    with pytest.raises(UserError) as e:
        pipeline.run(tiny(*overrides), tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
    return e.value


def test_teachers_that_do_not_match_are_refused_before_any_data(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.Context, "data", property(lambda self: pytest.fail("the data were read")))
    option = "schedule.finetune.distill.teacher"
    other_classes = saved_teacher(tmp_path / "five.pt", num_classes=5, in_channels=3)
    e = refusal(tmp_path, *DISTILLED, f"{option}={other_classes}")
    assert (e.option, e.why) == (option, f"the teacher {other_classes} gives 5 classes; this run has 10")
    grey = saved_teacher(tmp_path / "grey.pt", num_classes=10, in_channels=1)
    e = refusal(tmp_path, *DISTILLED, f"{option}={grey}")
    assert e.option == option and "does not take this run's 3x16x16 images" in e.why
    factory = {"name": "custom", "target": "os:system", "num_classes": 10, "in_channels": 3, "image_size": 16}
    torch.save({"arch": factory, "state_dict": {}}, tmp_path / "code.pt")  # names code: the trust rule refuses it
    e = refusal(tmp_path, *DISTILLED, f"{option}={tmp_path / 'code.pt'}")
    assert e.option == option and "a file never runs code unless asked" in e.why
    e = refusal(tmp_path, *DISTILLED, f"{option}={tmp_path / 'missing.pt'}")
    assert e.option == option and "does not exist" in e.why
    e = refusal(tmp_path, "schedule.pretrain.distill.alpha=0.5")
    assert e.option == "schedule.pretrain.distill.teacher" and "before prune" in e.why
    e = refusal(tmp_path, *DISTILLED, "schedule.stages=[prune,finetune]")
    assert e.option == option and "no trained dense model" in e.why


def test_a_model_block_teacher_loads_strictly(tmp_path, monkeypatch):
    """A torchvision teacher with weights of 1000 classes is refused (its classifier is not replaced, as
    model.weights_path does for a network to train); one of the run's 10 classes builds and checks."""
    import torchvision

    from prune_cli.stages.distill import build_teacher

    option = "schedule.finetune.distill.teacher"
    imagenet, ours = tmp_path / "imagenet.pt", tmp_path / "ours.pt"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), imagenet)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), ours)
    block = "{name: torchvision, network: resnet18, weights_path: %s}"
    e = refusal(tmp_path, *DISTILLED, f"{option}={block % imagenet}")
    assert e.option == option and "does not fit the network with this run's 10 classes" in e.why
    e = refusal(tmp_path, *DISTILLED, f"{option}={{name: torchvision, network: resnet18}}")
    assert e.option == option and "needs weights_path" in e.why

    class Ctx:  # what build_teacher reads of a run's context
        cfg = tiny()
        device, input_shape, num_classes = torch.device("cpu"), (3, 16, 16), 10
        arch = pipeline.Context.arch

    block = {"name": "torchvision", "network": "resnet18", "weights_path": str(ours)}
    teacher = build_teacher(Ctx(), "finetune", block)
    assert teacher.digest == weights_digest(teacher.net.state_dict())
    assert torch.equal(teacher.net.state_dict()["net.fc.weight"], torch.load(ours)["fc.weight"])


def test_the_finetunes_between_prune_steps_distil_as_the_finetune_block_says(tmp_path):
    """Two prune steps with a one-epoch finetune between them: distilled from the dense model, as the prune row
    records; its loss is not the plain run's."""
    steps = ["prune.steps=2", "prune.step_epochs=1", "schedule.stages=[pretrain,prune]"]
    losses = {}
    for name, extra in (("plain", []), ("taught", DISTILLED)):
        pipeline.run(tiny(*steps, *extra, "schedule.pretrain.epochs=1"), tmp_path / name)
        rows = pd.read_csv(tmp_path / name / "results.csv")
        metrics = pd.read_csv(tmp_path / name / "metrics.csv")
        losses[name] = metrics[metrics.stage == "prune_step1"].train_loss.item()
    assert rows[rows.stage == "prune"].distill_teacher.item() == "dense checkpoints/pretrain.pt"
    assert losses["taught"] != losses["plain"]


@pytest.mark.slow
def test_the_dense_teacher_is_found_wherever_the_run_starts(distilled_run, tmp_path):
    """The checkpoint ``teacher: dense`` reads, for a run started fresh, from a dense checkpoint (the schedule's
    stages before pruning already done, or none listed), and from a pruned one (its run's dense model, beside it)."""
    from types import SimpleNamespace

    from prune_cli.stages.distill import dense_path

    checkpoints = distilled_run / "checkpoints"
    cases = [
        ([], None, tmp_path / "checkpoints" / "pretrain.pt"),  # trained in this run
        ([], checkpoints / "pretrain.pt", checkpoints / "pretrain.pt"),  # the schedule resumes after pretrain
        (["schedule.stages=[prune,finetune]"], checkpoints / "pretrain.pt", checkpoints / "pretrain.pt"),
        (["schedule.stages=[finetune]"], checkpoints / "prune.pt", checkpoints / "pretrain.pt"),  # pruned already
    ]
    for overrides, init_from, want in cases:
        cfg = tiny(*DISTILLED, *overrides, f"init_from={init_from}" if init_from else "init_from=null")
        ctx = SimpleNamespace(cfg=cfg, run=SimpleNamespace(ckpt_dir=tmp_path / "checkpoints"))
        assert dense_path(ctx, "finetune") == want, (overrides, init_from)
