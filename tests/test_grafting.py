"""Filter grafting: entropy, alpha, the external ring, the noise and internal variants, lr schedules, and the
training hook that brings it into every training stage (switched off in iterative pruning's step finetunes)."""

import copy
import math

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from prune_cli.core.options import defaults
from prune_cli.engine.hooks import TRAINING_HOOKS, active_hooks
from prune_cli.methods.grafting import (
    BLOCK,
    Grafting,
    filter_entropy,
    graft_alpha,
    graft_internal,
    graft_layers,
    graft_noise,
    graft_ring,
    layer_entropy,
    lr_schedules,
)
from prune_cli.models import build_model


def model_of(name, seed, **kw):
    torch.manual_seed(seed)
    m = build_model({"name": name, "num_classes": 10, "in_channels": 3, **kw})
    with torch.no_grad():  # non-trivial BN parameters and statistics, so that grafting them is visible
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5), mod.bias.normal_(), mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
    return m


# ------------------------------------------------------------------ entropy and alpha


def test_entropy_hand_count():
    # 10 distinct values spread over 10 bins: one per bin -> ln 10
    assert float(layer_entropy(torch.arange(10.0))) == pytest.approx(math.log(10))
    # bins of width 0.1 over [0, 1]: 0, 0, 0 in bin 0, 1 (the max) in bin 9 -> p = (3/4, 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(layer_entropy(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))) == pytest.approx(h)
    # 0, 0.15, 0.16, 1.0 with width 0.1: bins 0, 1, 1, 9 -> p = (1/4, 1/2, 1/4)
    h = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    assert float(layer_entropy(torch.tensor([0.0, 0.15, 0.16, 1.0]))) == pytest.approx(h)
    assert float(layer_entropy(torch.full((3, 3), 0.7))) == 0.0  # constant: H = 0
    # a different number of bins: [0, 1, 2, 3] in 2 bins -> 2 and 2 -> ln 2
    assert float(layer_entropy(torch.tensor([0.0, 1.0, 2.0, 3.0]), bins=2)) == pytest.approx(math.log(2))


def test_filter_entropy_is_per_filter_and_vectorised():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    w[2] = 0.25  # constant filter
    w[4] = torch.arange(27.0).view(3, 3, 3)  # 27 values over 10 bins
    h = filter_entropy(w)
    assert h.shape == (6,)
    for o in range(6):
        assert float(h[o]) == pytest.approx(float(layer_entropy(w[o])), abs=1e-6)
    assert float(h[2]) == 0.0
    counts = torch.tensor([3, 3, 3, 2, 3, 3, 2, 3, 3, 2], dtype=torch.float)  # floor(v * 10 / 26)
    p = counts / 27
    assert float(h[4]) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)


def test_alpha_formula():
    assert graft_alpha(2.0, 2.0) == 0.5
    assert graft_alpha(1.2, 1.19) == pytest.approx(0.4 / math.pi * math.atan(500 * 0.01) + 0.5)
    assert graft_alpha(1.19, 1.2) == pytest.approx(0.5 - 0.4 / math.pi * math.atan(5.0))
    assert graft_alpha(1.0, 1.001, A=0.2, c=100.0) == pytest.approx(0.2 / math.pi * math.atan(-0.1) + 0.5)
    assert 0.3 < graft_alpha(0.0, 10.0) < 0.31 and 0.69 < graft_alpha(10.0, 0.0) < 0.7
    t = graft_alpha(torch.tensor([2.0, 2.1]), torch.tensor([2.0, 2.0]))
    assert torch.allclose(t, torch.tensor([0.5, 0.4 / math.pi * math.atan(50.0) + 0.5]))


# ------------------------------------------------------------------ the ring


def test_graft_layers_pairs_convs_with_their_bn():
    layers = dict(graft_layers(model_of("resnet20", 0)))
    assert layers["conv1"] == "bn1" and layers["layers.0.0.conv2"] == "layers.0.0.bn2"
    assert layers["fc"] is None and len(layers) == 20
    vgg = dict(graft_layers(model_of("vgg11", 0, head="li")))
    assert vgg["features.0"] == "features.1" and vgg["classifier.0"] == "classifier.1"
    assert vgg["classifier.3"] is None
    assert all(bn is None for bn in dict(graft_layers(model_of("vgg11", 0), "conv")).values())
    assert "classifier.0" not in dict(graft_layers(model_of("vgg11", 0), "conv_bn"))


@pytest.mark.parametrize("scope", ["conv", "conv_bn", "all"])
def test_grafting_identical_networks_changes_nothing(scope):
    a = model_of("resnet20", 0, shortcut="B")
    b = copy.deepcopy(a)
    before = copy.deepcopy(a.state_dict())
    alphas = graft_ring([a, b], scope=scope)
    assert all(v == 0.5 for row in alphas for v in row.values())
    for m in (a, b):
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k


def reference_ring(models, scope, A=0.4, c=500.0):
    """An explicit per-layer loop in module order: a BN takes the alpha of the weight layer just before it."""
    pre = [copy.deepcopy(m) for m in models]
    n = len(models)
    kinds = {"conv": (nn.Conv2d,), "conv_bn": (nn.Conv2d,), "all": (nn.Conv2d, nn.Linear)}[scope]
    for m in range(n):
        mine, other = list(pre[m].named_modules()), list(pre[(m - 1) % n].named_modules())
        target = dict(models[m].named_modules())
        alpha = None
        for (name, u), (_, v) in zip(mine, other):
            if isinstance(u, (nn.Conv2d, nn.Linear)):
                alpha = None
                if isinstance(u, kinds):
                    alpha = (A / math.pi) * math.atan(
                        c * (float(layer_entropy(u.weight)) - float(layer_entropy(v.weight)))
                    ) + 0.5
                    names = ["weight"] + (["bias"] if u.bias is not None else [])
                else:
                    continue
            elif isinstance(u, nn.modules.batchnorm._BatchNorm) and scope != "conv" and alpha is not None:
                names = ["weight", "bias", "running_mean", "running_var"]
            else:
                continue
            with torch.no_grad():
                for t in names:
                    getattr(target[name], t).copy_(alpha * getattr(u, t) + (1 - alpha) * getattr(v, t))
    return models


@pytest.mark.slow
# VGG-11 at a quarter width: the same layers (convs, BNs, the li head's linears), 1/16 of the weights to histogram
@pytest.mark.parametrize("name,kw", [("resnet20", {}), ("vgg11", {"head": "li", "width_mult": 0.25})])
@pytest.mark.parametrize("scope", ["conv", "conv_bn", "all"])
def test_ring_of_three_matches_reference(name, kw, scope):
    models = [model_of(name, s, **kw) for s in range(3)]
    expected = reference_ring([copy.deepcopy(m) for m in models], scope)
    originals = [copy.deepcopy(m.state_dict()) for m in models]
    alphas = graft_ring(models, scope=scope)
    assert len(alphas) == 3 and set(alphas[0]) == {n for n, _ in graft_layers(models[0], scope)}
    assert any(abs(a - 0.5) > 0.01 for row in alphas for a in row.values())
    for m, e, o in zip(models, expected, originals):
        got, want = m.state_dict(), e.state_dict()
        for k in want:
            assert torch.allclose(got[k].float(), want[k].float(), atol=1e-6), k
        changed = {k for k in o if not torch.equal(o[k], got[k])}
        if scope == "conv":
            assert all("bn" not in k and "fc" not in k for k in changed)
        if scope == "all":
            assert any(k.startswith(("fc", "classifier")) for k in changed)
        assert not any(k.endswith("num_batches_tracked") for k in changed)


def test_ring_alpha_per_layer_and_rounding():
    a, b = model_of("resnet20", 0), model_of("resnet20", 1)
    h = {
        n: (
            float(layer_entropy(dict(a.named_modules())[n].weight)),
            float(layer_entropy(dict(b.named_modules())[n].weight)),
        )
        for n, _ in graft_layers(a)
    }
    alphas = graft_ring([copy.deepcopy(a), copy.deepcopy(b)])
    for n, (ha, hb) in h.items():
        assert alphas[0][n] == pytest.approx(graft_alpha(ha, hb))  # model 0 takes from model 1
        assert alphas[1][n] == pytest.approx(graft_alpha(hb, ha))
        assert alphas[0][n] + alphas[1][n] == pytest.approx(1.0)
    rounded = graft_ring([copy.deepcopy(a), copy.deepcopy(b)], round_decimals=2)
    assert all(v == round(v, 2) for v in rounded[0].values())


# ------------------------------------------------------------------ noise and internal variants


def test_noise_only_touches_small_filters():
    conv = nn.Conv2d(2, 6, 3, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[1] = 0.01
        conv.weight[4] = 0.0
    model = nn.Sequential(conv)
    before = conv.weight.detach().clone()
    touched = graft_noise(
        model, epoch=3, sigma0=0.5, decay=0.5, threshold=0.1, generator=torch.Generator().manual_seed(0)
    )
    assert touched == {"0": 2}
    diff = (conv.weight - before).flatten(1)
    assert torch.equal(diff[[0, 2, 3, 5]], torch.zeros(4, 18))
    assert (diff[[1, 4]] != 0).all()
    # sigma_e = 0.5 * 0.5**3 = 0.0625
    assert 0.03 < float(diff[[1, 4]].detach().std()) < 0.1
    # late epochs: almost no noise
    graft_noise(model, epoch=40, sigma0=0.5, decay=0.5, threshold=0.1)
    assert float((conv.weight.detach() - before).flatten(1)[[0, 2, 3, 5]].abs().max()) == 0.0


def test_internal_copies_highest_entropy_onto_lowest():
    conv, bn = nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(6, 1, 3, 3, generator=g))
        conv.weight[3] = 1.0  # H = 0
        conv.weight[5, 0] = torch.tensor([[0.0, 0, 0], [0, 0, 0], [0, 0, 1.0]])  # H low (8/9, 1/9)
        conv.weight[0] = torch.linspace(0, 1, 9).view(1, 3, 3)  # 9 values in 9 different bins: H = ln 9
        conv.weight[2] = torch.tensor([0.0, 0.05, 0.25, 0.37, 0.5, 0.62, 0.75, 0.87, 1.0]).view(1, 3, 3)
        bn.weight.copy_(torch.arange(6.0)), bn.bias.copy_(-torch.arange(6.0))
    model = nn.Sequential(conv, bn)
    h = filter_entropy(conv.weight)
    before = conv.weight.detach().clone()
    pairs = graft_internal(model, share=2 / 6)
    lowest, highest = torch.argsort(h)[:2].tolist(), torch.argsort(h, descending=True)[:2].tolist()
    assert lowest == [3, 5] and highest == [0, 2]
    assert len(set(h.tolist())) == 6  # no ties
    assert pairs == {"0": list(zip(highest, lowest))}
    for src, dst in pairs["0"]:
        assert torch.equal(conv.weight[dst], before[src])
        assert float(bn.weight[dst]) == src and float(bn.bias[dst]) == -src
    others = [o for o in range(6) if o not in lowest]
    assert torch.equal(conv.weight[others], before[others])


def test_internal_share_rounding_and_blend():
    conv = nn.Conv2d(3, 10, 3)
    pairs = graft_internal(nn.Sequential(conv), share=0.05)  # floor(0.5) -> at least 1
    assert len(pairs["0"]) == 1
    pairs = graft_internal(nn.Sequential(nn.Conv2d(3, 10, 3)), share=0.9)  # at most O // 2
    assert len(pairs["0"]) == 5
    conv = nn.Conv2d(1, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight[0] = 1.0
        conv.weight[1] = torch.arange(9.0).view(1, 3, 3)
    before = conv.weight.detach().clone()
    graft_internal(nn.Sequential(conv), share=0.5, blend=True)
    a = graft_alpha(0.0, float(layer_entropy(before[1])))
    assert torch.allclose(conv.weight[0], a * before[0] + (1 - a) * before[1])
    assert torch.equal(conv.weight[1], before[1])


# ------------------------------------------------------------------ lr schedules


def test_lr_schedules():
    same = lr_schedules(2, "same", 0.1, 200)
    assert [f(0) for f in same] == [0.1, 0.1]
    assert same[0](100) == pytest.approx(0.05) and same[1](200) == pytest.approx(0.0)
    slr = lr_schedules(2, "slr", 0.1, 200)
    assert [slr[0](e) for e in (0, 59, 60, 119.5, 120, 180, 199)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 1e-4, 1e-4]
    )
    assert slr[1](70) == slr[0](70)
    dlr = lr_schedules(2, "dlr", 0.1, 200)
    assert [f(0) for f in dlr] == pytest.approx([0.05, 0.1])
    assert dlr[0](100) == pytest.approx(0.025) and dlr[1](50.5) == pytest.approx(
        0.1 * (1 + math.cos(math.pi * 50.5 / 200)) / 2
    )
    assert [f(0) for f in lr_schedules(3, "dlr", 1.0, 10)] == pytest.approx([0.25, 0.75, 1.0])
    with pytest.raises(ValueError):
        lr_schedules(2, "nope", 0.1, 10)


# ------------------------------------------------------------------ the training hook


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def graft_settings(**graft):
    return OmegaConf.create({"lr": 0.1, "gamma": 0.1, "graft": {**defaults(BLOCK.fields), **graft}})


def test_the_hook_is_registered_and_on_only_when_a_variant_is_set():
    assert TRAINING_HOOKS.get("graft") is Grafting
    assert active_hooks(graft_settings()) == []
    (hook,) = active_hooks(graft_settings(variant="noise"))
    assert isinstance(hook, Grafting)
    model = model_of("resnet20", 0)
    assert hook.partners(model, copies=True, seed=0, stage="pretrain") == []  # single-network variants
    assert hook.lr_functions(graft_settings(), 1, 10) is None  # one network: the stage's schedule


def test_the_hook_makes_partners_their_lrs_and_the_ring():
    hook = Grafting.switched_on(graft_settings(variant="external", networks=3, lr_schedules="dlr"))
    model = model_of("resnet20", 0)
    copies = hook.partners(model, copies=True, seed=0, stage="finetune")
    assert len(copies) == 2 and all(same_weights(c, model) for c in copies)
    fresh = hook.partners(model, copies=False, seed=0, stage="pretrain")
    assert not same_weights(fresh[0], fresh[1]) and not same_weights(fresh[0], model)  # each its own seed
    assert [f(0) for f in hook.lr_functions(graft_settings(), 3, 10)] == pytest.approx([0.025, 0.075, 0.1])
    models = [model, *copies[:1]]
    expected = [copy.deepcopy(m) for m in models]
    with torch.no_grad():  # two different networks, so the ring changes both
        next(models[1].parameters()).mul_(2)
        next(expected[1].parameters()).mul_(2)
    graft_ring(expected)
    hook.after_epoch(models, 0, seed=0)
    assert all(same_weights(got, want) for got, want in zip(models, expected))
    assert not same_weights(models[0], model_of("resnet20", 0))


@pytest.mark.slow
def test_step_finetunes_train_without_grafting(tiny, tmp_path):
    from prune_cli.run import pipeline

    cfg = tiny("prune.steps=2", "prune.step_epochs=1", "schedule.finetune.graft.variant=external")
    pipeline.run(cfg, tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    step = metrics[metrics["stage"] == "prune_step1"]
    assert len(step) == 1 and step["net"].isna().all()  # one network, as without grafting
    assert sorted(metrics[metrics["stage"] == "finetune"]["net"]) == [0, 1]
