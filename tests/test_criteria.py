"""Every criterion against an independent (loop / hand / autograd) computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.importance.criteria import (
    CRITERIA,
    Criterion,
    Sample,
    build_criterion,
    feature_map_ranks,
    histogram_entropy,
    polarization_threshold,
)
from prune_cli.models import Prunable, build_model
from prune_cli.structure.groups import ChannelGroup

CONF = Path(__file__).resolve().parents[1] / "conf" / "criterion"


NAMES = ["l1", "l2", "fpgm", "bn_scale", "group_norm", "apoz", "hrank", "entropy", "taylor", "random"]


def resnet20(seed: int = 0) -> Prunable:
    torch.manual_seed(seed)
    return build_model({"name": "resnet20", "num_classes": 10, "in_channels": 1})


def vgg11(seed: int = 0) -> Prunable:
    torch.manual_seed(seed)
    return build_model({"name": "vgg11", "num_classes": 10, "in_channels": 1, "width_mult": 0.125})


def sample(n: int = 6, size: int = 8, seed: int = 0, batch_size: int = 128) -> Sample:
    g = torch.Generator().manual_seed(seed)
    return Sample(torch.randn(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g), batch_size)


class Tiny(Prunable):
    """x -> 1x1 identity conv -> BN (identity up to 1/sqrt(1+eps) in eval) -> ReLU -> 1x1 conv -> mean -> logits.

    The group's post-ReLU activation is relu(x) / sqrt(1 + eps): tests choose it through x."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.arch = {"name": "tiny", "widths": [c]}
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(c).reshape(c, c, 1, 1))

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x)))).mean(dim=(2, 3))

    def channel_groups(self):
        return [ChannelGroup("g", "conv", "bn", ("head",))]


def loop_vectors(model, granularity):
    """Per group, per channel: the judging weights as a flat vector, by explicit loops."""
    mods = dict(model.named_modules())
    out = []
    for g in model.channel_groups():
        width = mods[g.conv].weight.shape[0]
        rows = []
        for c in range(width):
            if granularity == "filter":
                rows.append(mods[g.conv].weight[c].detach().flatten())
            else:
                rows.append(torch.cat([mods[n].weight[:, c].detach().flatten() for n in g.consumers]))
        out.append(rows)
    return out


# ---------------------------------------------------------------- norms


@pytest.mark.parametrize("make", [resnet20, vgg11])
@pytest.mark.parametrize("granularity", ["filter", "feature"])
def test_l1_l2_against_loops(make, granularity):
    model = make()
    l1 = build_criterion({"name": "l1"}).scores(model, granularity)
    l2 = build_criterion({"name": "l2"}).scores(model, granularity)
    vecs = loop_vectors(model, granularity)
    assert [len(s) for s in l1] == model.widths
    for s1, s2, rows in zip(l1, l2, vecs):
        assert s1.dtype == torch.float32 and s1.device.type == "cpu"
        exp1 = [sum(abs(float(w)) for w in r.tolist()) for r in rows]
        exp2 = [math.sqrt(sum(float(w) ** 2 for w in r.tolist())) for r in rows]
        assert torch.allclose(s1, torch.tensor(exp1), rtol=1e-5)
        assert torch.allclose(s2, torch.tensor(exp2), rtol=1e-5)


def test_feature_granularity_sees_linear_consumer():
    model = vgg11()
    mods = dict(model.named_modules())
    last = model.channel_groups()[-1]
    assert isinstance(mods[last.consumers[0]], nn.Linear)
    s = build_criterion({"name": "l1"}).scores(model, "feature")[-1]
    assert torch.allclose(s, mods["classifier.0"].weight.abs().sum(0), rtol=1e-5)


def test_granularity_option_and_override():
    model = resnet20()
    feat = build_criterion({"name": "l2", "granularity": "feature"})
    assert all(torch.equal(a, b) for a, b in zip(feat.scores(model), feat.scores(model, "feature")))
    assert not torch.equal(feat.scores(model)[0], feat.scores(model, "filter")[0])
    with pytest.raises(UserError):
        feat.scores(model, "stripe")


def test_group_norm():
    model = resnet20()
    mods = dict(model.named_modules())
    crit = build_criterion({"name": "group_norm"})
    feature, filt = crit.scores(model), crit.scores(model, "filter")
    for g, sf, sw in zip(model.channel_groups(), feature, filt):
        for c in range(len(sf)):
            sq = sum(float((mods[n].weight[:, c].detach() ** 2).sum()) for n in g.consumers)
            assert sf[c].item() == pytest.approx(math.sqrt(sq), rel=1e-5)
            assert sw[c].item() == pytest.approx(float(mods[g.conv].weight[c].detach().norm()), rel=1e-5)
    # a feature-wise group driven to zero (what group lasso does) scores 0
    with torch.no_grad():
        mods["layers.1.2.conv2"].weight[:, 5] = 0
    assert crit.scores(model)[5][5].item() == 0.0


# ---------------------------------------------------------------- FPGM


def test_fpgm_against_double_loop():
    model = resnet20()
    for granularity in ["filter", "feature"]:
        scores = build_criterion({"name": "fpgm"}).scores(model, granularity)
        for s, rows in zip(scores, loop_vectors(model, granularity)):
            exp = [sum(float(torch.sqrt(((a.double() - b.double()) ** 2).sum())) for b in rows) for a in rows]
            assert torch.allclose(s.double(), torch.tensor(exp, dtype=torch.float64), rtol=1e-5)


def test_fpgm_geometric_median_is_lowest_and_mix():
    model = Tiny(4)
    with torch.no_grad():  # filters 0..3 on a line at 0, 1, 2, 10: the median-most filter is 1 (or 2)
        model.conv.weight.copy_(torch.tensor([0.0, 1.0, 2.0, 10.0]).reshape(4, 1, 1, 1).expand(4, 4, 1, 1))
    fpgm = build_criterion({"name": "fpgm"}).scores(model)[0]
    v = torch.tensor([0.0, 1.0, 2.0, 10.0]) * 2  # ||F|| = 2 * value (4 equal entries)
    dist = (v[:, None] - v[None]).abs().sum(1)
    assert torch.allclose(fpgm, dist)
    mixed = build_criterion({"name": "fpgm", "mix": 0.25}).scores(model)[0]
    assert torch.allclose(mixed, 0.25 * dist / dist.max() + 0.75 * v / v.max())
    only_norm = build_criterion({"name": "fpgm", "mix": 0.0}).scores(model)[0]
    assert torch.allclose(only_norm, dist)  # mix 0 = pure FPGM
    pure_norm = build_criterion({"name": "fpgm", "mix": 1.0}).scores(model)[0]
    assert torch.allclose(pure_norm, dist / dist.max())


# ---------------------------------------------------------------- entropy


def test_entropy_hand_count():
    # min 0, max 1, 10 bins of width 0.1: bins 0, 1, 1, 3, 5, 5, 5, 9 (max goes to the last bin)
    row = torch.tensor([[0.0, 0.12, 0.17, 0.33, 0.55, 0.56, 0.58, 1.0]])
    p = np.array([1, 2, 1, 3, 1]) / 8
    assert histogram_entropy(row.double()).item() == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert histogram_entropy(torch.zeros(2, 9)).tolist() == [0.0, 0.0]  # constant filter: one bin
    assert histogram_entropy(torch.arange(10.0)[None]).item() == pytest.approx(math.log(10))  # uniform


def test_entropy_criterion_against_numpy_histogram():
    model = resnet20()
    for granularity in ["filter", "feature"]:
        scores = build_criterion({"name": "entropy"}).scores(model, granularity)
        for s, rows in zip(scores[::4], loop_vectors(model, granularity)[::4]):
            exp = []
            for r in rows:
                counts, _ = np.histogram(r.numpy(), bins=10)
                p = counts[counts > 0] / counts.sum()
                exp.append(float(-(p * np.log(p)).sum()))
            assert torch.allclose(s.double(), torch.tensor(exp, dtype=torch.float64), atol=1e-6)


# ---------------------------------------------------------------- BN scale, polarization


def test_bn_scale_and_rules():
    model = resnet20()
    mods = dict(model.named_modules())
    g0 = model.channel_groups()[0]
    with torch.no_grad():
        mods[g0.bn].weight.copy_(torch.linspace(-0.8, 0.7, 16))
    crit = build_criterion({"name": "bn_scale"})
    scores = crit.scores(model, "feature")  # granularity ignored
    assert torch.allclose(scores[0], torch.linspace(-0.8, 0.7, 16).abs())
    assert all(torch.equal(s, mods[g.bn].weight.abs()) for s, g in zip(scores[1:], model.channel_groups()[1:]))
    assert crit.auto_threshold(scores) is None
    assert build_criterion({"name": "bn_scale", "rule": "slimming"}).auto_threshold(scores) is None
    assert Criterion.auto_threshold(crit, scores) is None

    polar = build_criterion({"name": "bn_scale", "rule": "polarization"})
    vals = [torch.full((10,), 0.003), torch.tensor([0.004] * 5 + [0.61] * 5), torch.full((20,), 0.655)]
    # bins: 0 -> 15 values, 1..60 empty, 61 -> 5, 65 -> 20: first minimum = empty plateau 1..60
    assert polar.auto_threshold(vals) == pytest.approx(0.31)
    with pytest.raises(UserError) as e:
        polar.auto_threshold([torch.full((8,), 0.5)])  # unimodal: no local minimum
    assert e.value.option == "criterion.rule"


def test_polarization_threshold_rules():
    def from_counts(counts, w=0.01):
        return torch.cat([torch.full((n,), (k + 0.5) * w) for k, n in enumerate(counts)])

    # bimodal: a pile at 0, a valley of empty bins 2..49, the other mode at 0.50..0.54
    bimodal = torch.cat([torch.rand(30) * 0.0099, torch.full((5,), 0.015), 0.50 + torch.rand(40) * 0.049])
    t = polarization_threshold(bimodal)
    assert t == pytest.approx(0.26)  # centre of bins 2..49 = (2 + 50) / 2 * 0.01
    assert int((bimodal < t).sum()) == 35

    assert polarization_threshold(from_counts([5, 2, 2, 7])) == pytest.approx(0.02)  # plateau 1..2, centre
    assert polarization_threshold(from_counts([10, 3, 5, 0, 0, 8])) == pytest.approx(0.015)  # the FIRST minimum
    assert polarization_threshold(from_counts([9, 4, 4, 6, 1, 8])) == pytest.approx(0.02)
    assert polarization_threshold(from_counts([4, 4, 2, 3], 0.1), 0.1) == pytest.approx(0.25)  # plateau 0..1 is no min
    assert polarization_threshold(from_counts([3, 5, 2, 6], 0.5), 0.5) == pytest.approx(1.25)  # bin width
    for counts in ([0, 5, 9], [9, 5, 1], [3, 3, 3], [2, 5, 2], [7]):  # no interior minimum (edges never count)
        with pytest.raises(ValueError):
            polarization_threshold(from_counts(counts))
    for bad in (torch.tensor([]), torch.tensor([-0.1, 0.5]), torch.tensor([float("nan"), 0.1])):
        with pytest.raises(ValueError):
            polarization_threshold(bad)


# ---------------------------------------------------------------- data-driven


def test_apoz_known_zeros():
    model = Tiny(4)
    x = torch.ones(5, 4, 3, 3)
    x[:, 0] = -1.0  # always zero after ReLU: APoZ 1
    x[:, 1].view(5, -1)[:, :3] = 0.0  # 3 of 9 positions zero: 1/3
    x[:2, 2] = -2.0  # 2 of 5 images entirely zero: 2/5
    scores = build_criterion({"name": "apoz", "batch_size": 2}).scores(
        model, sample=Sample(x, torch.zeros(5, dtype=torch.long))
    )
    assert torch.allclose(scores[0], -torch.tensor([1.0, 1 / 3, 2 / 5, 0.0]))
    # num_images: only the first 2 images
    scores = build_criterion({"name": "apoz", "num_images": 2}).scores(
        model, sample=Sample(x, torch.zeros(5, dtype=torch.long))
    )
    assert torch.allclose(scores[0], -torch.tensor([1.0, 1 / 3, 1.0, 0.0]))


def bn_outputs(model, x) -> dict:
    """Reference activations: every channel group's BN output on ``x`` (eval mode), by group name."""
    mods, outs = dict(model.named_modules()), {}
    hooks = [
        mods[g.bn].register_forward_hook(lambda m, i, o, n=g.name: outs.__setitem__(n, o))
        for g in model.channel_groups()
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


def test_apoz_on_resnet_against_own_hooks():
    model, smp = resnet20(), sample(7)
    scores = build_criterion({"name": "apoz", "batch_size": 3}).scores(model, "filter", smp)
    outs = bn_outputs(model, smp.x)
    for s, g in zip(scores, model.channel_groups()):
        assert torch.allclose(s, -(F.relu(outs[g.name]) == 0).float().mean(dim=(0, 2, 3)), atol=1e-6)


def test_rank_helper_against_loop():
    g = torch.Generator().manual_seed(0)
    ranks = torch.randint(0, 7, (3, 4), generator=g)  # 0 = an all-zero map
    maps = torch.zeros(3, 4, 6, 7)
    for b in range(3):
        for c in range(4):
            r = int(ranks[b, c])
            maps[b, c] = torch.rand(6, r, generator=g) @ torch.rand(r, 7, generator=g)
    got = feature_map_ranks(maps)
    loop = torch.tensor([[int(torch.linalg.matrix_rank(maps[b, c])) for c in range(4)] for b in range(3)])
    assert torch.equal(got, loop) and torch.equal(got, ranks)


def test_hrank_known_ranks():
    g = torch.Generator().manual_seed(1)
    n, c = 8, 4
    ranks = torch.randint(1, 6, (n, c), generator=g)
    x = torch.zeros(n, c, 6, 6)
    for i in range(n):
        for j in range(c):
            r = int(ranks[i, j])  # non-negative factors: ReLU keeps the map, so its rank stays r
            x[i, j] = torch.rand(6, r, generator=g) @ torch.rand(r, 6, generator=g)
    x[:, 3] *= -1  # channel 3 is zero after ReLU: rank 0
    model = Tiny(c)
    crit = build_criterion({"name": "hrank", "batches": 2, "batch_size": 3})  # first 6 images
    assert crit.sample_size == 6
    scores = crit.scores(model, sample=Sample(x, torch.zeros(n, dtype=torch.long)))[0]
    exp = ranks[:6].double().mean(0)
    exp[3] = 0
    assert torch.allclose(scores, exp.float())


def test_hrank_on_resnet_against_loop():
    model, smp = resnet20(), sample(4)
    scores = build_criterion({"name": "hrank", "batches": 2, "batch_size": 2}).scores(model, sample=smp)
    outs = bn_outputs(model, smp.x)
    for s, g in zip(scores, model.channel_groups()):
        fm = F.relu(outs[g.name])
        exp = [np.mean([int(torch.linalg.matrix_rank(fm[b, c])) for b in range(len(fm))]) for c in range(fm.shape[1])]
        assert torch.allclose(s, torch.tensor(exp, dtype=torch.float32))


def test_taylor_against_autograd():
    model, smp = resnet20(), sample(7)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = build_criterion({"name": "taylor", "batch_size": 3}).scores(model, sample=smp)  # chunks 3, 3, 1
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # explicit: one pass over all images, retain_grad on one group's BN output, channel by channel
    model.eval()
    mods, saved = dict(model.named_modules()), {}
    grp = model.channel_groups()[4]

    def keep(m, i, o):
        o.retain_grad()
        saved["a"] = o

    h = mods[grp.bn].register_forward_hook(keep)
    F.cross_entropy(model(smp.x), smp.y, reduction="sum").backward()
    h.remove()
    a = saved["a"]
    for c in (0, 7, 31):
        exp = (a[:, c] * a.grad[:, c]).sum().abs() / len(smp.x)
        assert scores[4][c].item() == pytest.approx(exp.item(), rel=1e-4, abs=1e-9)
    model.zero_grad(set_to_none=True)


def test_data_criteria_restore_mode_and_hooks_on_error():
    model = resnet20()
    model.train()
    model.layers[1].eval()  # mixed modes survive
    bad = Sample(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))  # 3 channels: forward fails
    for name in ("apoz", "hrank", "taylor"):
        crit = build_criterion({"name": name})
        assert crit.needs_data and crit.sample_size > 0
        with pytest.raises(RuntimeError):
            crit.scores(model, sample=bad)
        with pytest.raises(ValueError):
            crit.scores(model)  # no sample
        assert model.training and not model.layers[1].training and model.layers[2].training
        assert all(not m._forward_hooks for m in model.modules())
    assert build_criterion({"name": "apoz", "num_images": 50}).sample_size == 50
    assert build_criterion({"name": "hrank"}).sample_size == 640


# ---------------------------------------------------------------- random


def test_random_seeded():
    model = resnet20()
    a = build_criterion({"name": "random", "seed": 3}).scores(model)
    b = build_criterion({"name": "random", "seed": 3}).scores(model, "feature")
    c = build_criterion({"name": "random", "seed": 4}).scores(model)
    assert [len(s) for s in a] == model.widths
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])  # groups get different draws


# ---------------------------------------------------------------- registry, configs


def test_registry_and_errors():
    assert set(NAMES) <= set(CRITERIA)
    with pytest.raises(UserError) as e:
        build_criterion({"name": "l3"})
    assert e.value.option == "criterion.name"
    bad = [
        ({"name": "l1", "p": 2}, "criterion.p"),
        ({"name": "fpgm", "mix": 1.5}, "criterion.mix"),
        ({"name": "fpgm", "mix": "x"}, "criterion.mix"),
        ({"name": "bn_scale", "rule": "otsu"}, "criterion.rule"),
        ({"name": "bn_scale", "bin_width": 0}, "criterion.bin_width"),
        ({"name": "apoz", "num_images": 0}, "criterion.num_images"),
        ({"name": "hrank", "batches": True}, "criterion.batches"),
        ({"name": "taylor", "batch_size": 2.5}, "criterion.batch_size"),
        ({"name": "random", "seed": -1}, "criterion.seed"),
        ({"name": "l2", "granularity": "kernel"}, "criterion.granularity"),
        ({"name": "apoz", "granularity": "filter"}, "criterion.granularity"),
    ]
    for cfg, option in bad:
        with pytest.raises(UserError) as e:
            build_criterion(cfg)
        assert e.value.option == option, cfg
    crit = build_criterion(OmegaConf.create({"name": "fpgm", "mix": 0.5}))
    assert crit.hparams == {"granularity": "filter", "mix": 0.5}


@pytest.mark.parametrize("name", NAMES)
def test_yaml_configs(name):
    path = CONF / f"{name}.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg["name"] == name
    keys = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(keys) == len(cfg) and all("#" in ln for ln in keys)  # a comment on every key
    crit = build_criterion(cfg)
    assert set(crit.hparams) == set(cfg) - {"name"}  # the YAML lists every option
    if crit.needs_data:
        assert "batch_size" in cfg and ({"num_images", "batches"} & set(cfg))


def test_scores_leave_model_unchanged():
    model = resnet20()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    smp = sample(2)
    for name in NAMES:
        out = build_criterion({"name": name}).scores(model, sample=smp)
        assert [len(s) for s in out] == model.widths and all(s.dim() == 1 for s in out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training
