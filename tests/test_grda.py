"""gRDA: the optimizer against its formula step by step (with an lr change), the linear lr schedule by hand,
the schedule's refusal, the plug-in's registration (its name and block in every training stage), and the sparsity
columns of a run."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from prune_cli.core.checkpoint import load_checkpoint
from prune_cli.core.errors import UserError
from prune_cli.engine.optimizers import OPTIMIZERS, make_optimizer
from prune_cli.engine.schedules import LR_SCHEDULES, LRSchedule, lr_at
from prune_cli.methods.grda import GRDA, GRDABuilder
from prune_cli.models import build_model
from prune_cli.stages import STAGES


def test_update_equals_the_formula_step_by_step():
    w0 = [0.3, -0.02, 0.0, 1.5]
    grads = [[0.5, -0.1, 0.2, 0.0], [0.1, 0.3, -0.4, 2.0], [-0.2, 0.1, 0.0, 0.5], [0.0, -0.3, 0.1, -1.0]]
    lrs = [0.1, 0.1, 0.05, 0.05]  # the lr halves before the third step
    c, mu = 0.2, 0.6
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = GRDA([p], lr=lrs[0], c=c, mu=mu)
    a, threshold = list(w0), 0.0
    for n, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        # by hand: A_n = A_(n-1) - lr_n g_n; the threshold grows by c lr_n^(1/2 + mu) (n^mu - (n-1)^mu)
        a = [ai - lr * gi for ai, gi in zip(a, g)]
        threshold += c * lr ** (0.5 + mu) * (n**mu - (n - 1) ** mu)
        expected = [math.copysign(max(abs(ai) - threshold, 0.0), ai) for ai in a]
        assert p.detach().tolist() == pytest.approx(expected, abs=1e-12)
    assert [x == 0.0 for x in p.detach().tolist()] == [e == 0.0 for e in expected]  # exact zeros, where due
    assert 0.0 in expected


def test_constant_lr_gives_the_closed_form_threshold():
    p = torch.nn.Parameter(torch.tensor([10.0], dtype=torch.float64))
    opt = GRDA([p], lr=0.1, c=0.5, mu=0.51)
    for _ in range(7):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert p.item() == pytest.approx(10.0 - 0.5 * 0.1 ** (0.5 + 0.51) * 7**0.51)


def test_linear_schedule_by_hand():
    st = OmegaConf.create({"lr_schedule": "linear", "lr": 0.1, "milestones": [0.5, 0.9], "gamma": 0.01})
    lrs = [lr_at(st, e, 10) for e in range(10)]
    # held for epochs 0-4, ramp from epoch 5 (0.1) to epoch 9 (0.001) over 4 epochs, then held
    assert lrs[:6] == pytest.approx([0.1] * 6)
    assert lrs[6:] == pytest.approx([0.1 - 0.099 * k / 4 for k in (1, 2, 3, 4)])


def test_the_plug_in_registers_the_optimizer_and_its_block():
    assert OPTIMIZERS.get("grda") is GRDABuilder
    for name in ("pretrain", "sparse_train", "finetune", "scratch"):
        options = {o.name: o for o in STAGES.get(name).options}
        assert options["optimizer"].choices == ("sgd", "adam", "grda")
        assert [f.name for f in options["grda"].fields] == ["c", "mu"]
    st = OmegaConf.create({"optimizer": "grda", "lr": 0.1, "grda": {"c": 0.2, "mu": 0.6}})
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], st)
    assert isinstance(optimizer, GRDA) and optimizer.defaults == {"lr": 0.1, "c": 0.2, "mu": 0.6}


def test_a_registered_schedule_is_offered_by_the_training_stages(monkeypatch):
    class Halving(LRSchedule):
        @staticmethod
        def lr(st, epoch, epochs):
            return st.lr / 2**epoch

    monkeypatch.setitem(LR_SCHEDULES._parts, "halving", Halving)  # registered for this test only
    choices = {o.name: o for o in STAGES.get("finetune").options}["lr_schedule"].choices
    assert choices == ("multistep", "step", "cosine", "constant", "linear", "halving")
    st = OmegaConf.create({"lr_schedule": "halving", "lr": 0.1})
    assert [lr_at(st, e, 4) for e in range(3)] == [0.1, 0.05, 0.025]


def test_a_linear_schedule_needs_two_milestones(compose, tmp_path):
    from prune_cli.run import pipeline

    cfg = compose("schedule=grda", "schedule.sparse_train.milestones=[0.5]")
    with pytest.raises(UserError) as e:
        pipeline.run(cfg, tmp_path)
    assert e.value.option == "schedule.sparse_train.milestones"


def test_a_run_reports_sparsity_and_removable_channels(compose, tmp_path):
    from helpers import TINY
    from prune_cli.run import pipeline

    cfg = compose(*TINY, "schedule=grda", "schedule.sparse_train.epochs=2", "schedule.sparse_train.grda.c=2.0")
    rows = pipeline.run(cfg, tmp_path)
    last = rows[-1]
    assert last["stage"] == "sparse_train" and last["weight_sparsity"] > 0.5
    # removable channels counted independently: the channel groups' filters that are exactly zero
    ck = load_checkpoint(tmp_path / "checkpoints" / "sparse_train.pt")
    model = build_model(ck["arch"])
    model.load_state_dict(ck["state_dict"])
    modules = dict(model.named_modules())
    zero = sum(int((modules[g.conv].weight.flatten(1) == 0).all(1).sum()) for g in model.channel_groups())
    assert last["removable_channels"] == zero and 0 < zero < sum(model.widths)
