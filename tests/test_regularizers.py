"""Regularizers: values and gradients against independent loop implementations, hand-computed
numbers, zero-kernel safety, polarization, layer selection, configs, sparsity statistics and
two short training runs on sklearn's digits (CPU, a few seconds each)."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.importance.regularizers import REGULARIZERS, Regularizer, build_regularizer, sparsity_stats
from prune_cli.models import build_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "regularizer"
HGSR_COMBOS = list(itertools.product(("feature", "filter"), ("squared", "sqrt"), ("l2", "l1half")))


# --------------------------------------------------------------------------- fixtures / helpers


def small_resnet(seed: int = 0) -> nn.Module:
    """ResNet-20 at 1/8 width (2/4/8 channels) with option-B 1x1 shortcut convs, float64, random BN."""
    torch.manual_seed(seed)
    m = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3, "width_mult": 0.125, "shortcut": "B"})
    m = m.double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(-1.0, 1.0)
    return m


def convs_except_shortcut_names(m) -> list[str]:
    """Written out explicitly for ResNet-20: stem + two convs per block (9 blocks)."""
    return ["conv1"] + [f"layers.{s}.{b}.conv{k}" for s in range(3) for b in range(3) for k in (1, 2)]


def weights(m, names):
    mods = dict(m.named_modules())
    return [mods[n].weight for n in names]


def rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> bool:
    return bool(((a - b).abs() <= rtol * b.abs() + 1e-12).all())


def grads(value: torch.Tensor, params):
    return torch.autograd.grad(value, params, allow_unused=False)


# Independent reference implementations: explicit Python loops over groups and kernels,
# using only scalar-level ops (sqrt of sum of squares, abs), float64.


def ref_kernel_norm(w: torch.Tensor, kernel_norm: str) -> torch.Tensor:
    if kernel_norm == "l2":
        return torch.sqrt((w * w).sum())
    return torch.sqrt(w.abs().sum())


def ref_l1(ws):
    return sum(w.abs().sum() for w in ws)


def ref_group_lasso(ws, grouping):
    total = 0.0
    for w in ws:
        w4 = w if w.dim() == 4 else w[:, :, None, None]
        n_groups = w4.shape[1] if grouping == "feature" else w4.shape[0]
        for g in range(n_groups):
            block = w4[:, g] if grouping == "feature" else w4[g]
            total = total + torch.sqrt((block**2).sum())
    return total


def ref_hgsr(ws, grouping, form, kernel_norm, mix):
    total = 0.0
    for w in ws:
        w4 = w if w.dim() == 4 else w[:, :, None, None]
        n_out, n_in = w4.shape[:2]
        groups = range(n_in) if grouping == "feature" else range(n_out)
        r = 0.0
        for g in groups:
            members = [(o, g) for o in range(n_out)] if grouping == "feature" else [(g, i) for i in range(n_in)]
            s = 0.0
            for o, i in members:
                s = s + ref_kernel_norm(w4[o, i], kernel_norm)
            r = r + (s**2 if form == "squared" else torch.sqrt(s))
        l1 = w4.abs().sum()
        total = total + mix * r + (1 - mix) * l1
    return total


# --------------------------------------------------------------------------- none / layer selection


def test_none_is_free_and_zero():
    m = small_resnet()
    reg = build_regularizer({"name": "none"}, m)
    assert type(reg) is Regularizer
    p = reg.penalty()
    assert p.dim() == 0 and float(p) == 0.0 and not p.requires_grad
    assert reg.value() == 0.0
    reg.after_step()
    assert build_regularizer(None, m).value() == 0.0


def test_layer_selection():
    m = small_resnet()
    all_convs = [n for n, x in m.named_modules() if isinstance(x, nn.Conv2d)]
    assert "layers.1.0.shortcut.0" in all_convs and "layers.2.0.shortcut.0" in all_convs
    sel = lambda **kw: build_regularizer({"name": "group_lasso", **kw}, m).layer_names
    assert sel() == convs_except_shortcut_names(m)  # default: all convs except the 1x1 shortcut projections
    assert sel(layers="all_convs") == all_convs
    assert sel(layers="all") == all_convs + ["fc"]
    assert sel(layers="prunable") == [f"layers.{s}.{b}.conv{k}" for s in range(3) for b in range(3) for k in (1, 2)]
    # l1 defaults to every conv and linear weight
    assert build_regularizer({"name": "l1"}, m).layer_names == all_convs + ["fc"]
    # VGG: prunable includes the linear head, which consumes the last conv's channels
    v = build_model({"name": "vgg11", "num_classes": 10, "in_channels": 3, "width_mult": 0.0625})
    names = build_regularizer({"name": "hgsr", "layers": "prunable"}, v).layer_names
    assert names[-1] == "classifier.0" and len(names) == 9
    # BN layers
    bns = [n for n, x in m.named_modules() if isinstance(x, nn.BatchNorm2d)]
    assert build_regularizer({"name": "bn_l1"}, m).layer_names == bns
    assert build_regularizer({"name": "polarization", "layers": "prunable"}, m).layer_names == [
        f"layers.{s}.{b}.bn1" for s in range(3) for b in range(3)
    ]


# --------------------------------------------------------------------------- values and gradients vs. loops


def check_against(reg, ref_value, params, rtol=1e-6):
    v = reg.penalty()
    assert v.dim() == 0 and v.dtype == torch.float64
    assert rel_close(v.detach(), ref_value.detach(), rtol), (float(v), float(ref_value))
    assert math.isclose(reg.value(), float(ref_value.detach()), rel_tol=1e-6)
    for a, b in zip(grads(v, params), grads(ref_value, params)):
        assert rel_close(a, b, rtol), (a - b).abs().max()


def test_l1_matches_loops():
    m = small_resnet()
    reg = build_regularizer({"name": "l1", "lam": 3e-4}, m)
    names = [n for n, x in m.named_modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    ws = weights(m, names)
    check_against(reg, 3e-4 * ref_l1(ws), ws)


@pytest.mark.parametrize("grouping", ["feature", "filter"])
def test_group_lasso_matches_loops(grouping):
    m = small_resnet(1)
    reg = build_regularizer({"name": "group_lasso", "lam": 2e-3, "grouping": grouping}, m)
    ws = weights(m, convs_except_shortcut_names(m))
    check_against(reg, 2e-3 * ref_group_lasso(ws, grouping), ws)


@pytest.mark.parametrize("grouping,form,kernel_norm", HGSR_COMBOS)
def test_hgsr_matches_loops(grouping, form, kernel_norm):
    m = small_resnet(2)
    cfg = {"name": "hgsr", "lam": 1e-3, "mix": 0.3, "grouping": grouping, "form": form, "kernel_norm": kernel_norm}
    reg = build_regularizer(cfg, m)
    ws = weights(m, convs_except_shortcut_names(m))
    check_against(reg, 1e-3 * ref_hgsr(ws, grouping, form, kernel_norm, 0.3), ws)


def test_hgsr_all_layers_includes_linear_as_1x1():
    m = small_resnet(3)
    reg = build_regularizer({"name": "hgsr", "layers": "all", "mix": 1.0}, m)
    names = [n for n, x in m.named_modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    ws = weights(m, names)
    check_against(reg, 1e-3 * ref_hgsr(ws, "feature", "squared", "l2", 1.0), ws)


def test_hgsr_mix_zero_is_l1_on_the_same_layers():
    m = small_resnet(6)
    reg = build_regularizer({"name": "hgsr", "mix": 0.0, "lam": 0.5}, m)
    ws = weights(m, convs_except_shortcut_names(m))
    check_against(reg, 0.5 * ref_l1(ws), ws)


def test_hgsr_gradcheck_finite_differences():
    """The vectorised penalty's autograd gradient equals finite differences (nonzero weights)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, bias=False).double()
    model = nn.Sequential(conv)
    w0 = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    for grouping, form, kernel_norm in HGSR_COMBOS:
        reg = build_regularizer(
            {"name": "hgsr", "grouping": grouping, "form": form, "kernel_norm": kernel_norm, "lam": 1.0}, model
        )

        def f(w, reg=reg):
            del conv.weight
            conv.weight = w  # a plain tensor attribute: the regularizer reads module.weight on every call
            return reg.penalty()

        assert torch.autograd.gradcheck(f, (w0.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


def test_hgsr_default_hand_computed():
    # W[o, i] kernels (3x3), o = output, i = input:
    #   W[0,0] = [[3,0,0],[0,4,0],[0,0,0]]   ||.||_2 = 5, ||.||_1 = 7
    #   W[1,0] = [[0,0,0],[0,0,0],[0,0,-2]]  ||.||_2 = 2, ||.||_1 = 2
    #   W[0,1] = [[1,2,2],[0,0,0],[0,0,0]]   ||.||_2 = 3, ||.||_1 = 5
    #   W[1,1] = 0                            ||.||_2 = 0, ||.||_1 = 0
    # feature groups (input channel i): i=0 -> 5 + 2 = 7, i=1 -> 3 + 0 = 3
    #   r_SQ = 7^2 + 3^2 = 58 ; ||W||_1 = 7 + 2 + 5 + 0 = 14
    #   default penalty = 1e-3 * (0.5 * 58 + 0.5 * 14) = 1e-3 * 36 = 0.036
    # other forms on the same weight (lam 1e-3, mix 1 -> only R_hier):
    #   filter, squared:  o=0 -> 5 + 3 = 8, o=1 -> 2 + 0 = 2   -> 64 + 4 = 68        -> 0.068
    #   feature, sqrt:    sqrt(7) + sqrt(3)                     = 4.377802118...      -> 0.004377802...
    #   feature, squared, l1half: (sqrt7 + sqrt2)^2 + (sqrt5 + 0)^2 = 9 + 2 sqrt14 + 5 = 21.483314774 -> 0.021483...
    w = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    w[0, 0, 0, 0], w[0, 0, 1, 1] = 3, 4
    w[1, 0, 2, 2] = -2
    w[0, 1, 0] = torch.tensor([1.0, 2.0, 2.0])
    conv = nn.Conv2d(2, 2, 3, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    model = nn.Sequential(conv)
    assert math.isclose(float(build_regularizer({"name": "hgsr"}, model).value()), 0.036, rel_tol=1e-12)
    one = {"name": "hgsr", "mix": 1.0}
    assert math.isclose(float(build_regularizer({**one, "grouping": "filter"}, model).value()), 0.068, rel_tol=1e-12)
    assert math.isclose(float(build_regularizer({**one, "form": "sqrt"}, model).value()), 0.004377802118, rel_tol=1e-9)
    assert math.isclose(
        float(build_regularizer({**one, "kernel_norm": "l1half"}, model).value()), 0.021483314774, rel_tol=1e-9
    )


# --------------------------------------------------------------------------- zero kernels: no NaN


def zeroed_model():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, bias=False).double()
    with torch.no_grad():
        conv.weight[0] = 0  # a whole filter group
        conv.weight[:, 1] = 0  # a whole feature group
        conv.weight[2, 2] = 0  # one more kernel
    return nn.Sequential(conv), conv


@pytest.mark.parametrize(
    "cfg",
    [{"name": "hgsr", "grouping": g, "form": f, "kernel_norm": k} for g, f, k in HGSR_COMBOS]
    + [{"name": "group_lasso", "grouping": g} for g in ("feature", "filter")]
    + [{"name": "l1"}],
)
def test_no_nan_gradient_with_zero_kernels(cfg):
    model, conv = zeroed_model()
    reg = build_regularizer(cfg, model)
    v = reg.penalty()
    assert torch.isfinite(v)
    (g,) = grads(v, [conv.weight])
    assert torch.isfinite(g).all()
    zero = conv.weight.detach() == 0
    assert (g[zero] == 0).all()  # the subgradient chosen at 0 is 0
    assert (g[~zero] != 0).all()
    # value equals the loop reference (no eps added anywhere)
    if cfg["name"] == "hgsr":
        ref = 1e-3 * ref_hgsr([conv.weight], cfg["grouping"], cfg["form"], cfg["kernel_norm"], 0.5)
        assert math.isclose(float(v.detach()), float(ref.detach()), rel_tol=1e-12)


# --------------------------------------------------------------------------- BN regularizers


def test_bn_l1_matches_loops_and_init_gamma():
    m = small_resnet(4)
    reg = build_regularizer({"name": "bn_l1", "lam": 1e-4, "init_gamma": None}, m)
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    gs = [b.weight for b in bns]
    ref = 1e-4 * sum(abs(x) for g in gs for x in g)
    check_against(reg, ref, gs)
    build_regularizer({"name": "bn_l1"}, m)  # default init_gamma 0.5 (Network Slimming)
    assert all((b.weight == 0.5).all() for b in bns)


def test_polarization_value_uses_global_mean_and_after_step_clamps():
    m = small_resnet(5)
    reg = build_regularizer({"name": "polarization", "lam": 2e-4, "t": 1.2, "init_gamma": None}, m)
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    gs = [b.weight for b in bns]
    flat = [x for g in gs for x in g]
    mean = sum(flat) / len(flat)
    ref = 2e-4 * (1.2 * sum(abs(x) for x in flat) - sum(abs(x - mean) for x in flat))
    check_against(reg, ref, gs)
    # a per-layer mean would give a different number: the test discriminates
    with torch.no_grad():
        per_layer = 2e-4 * sum(1.2 * g.abs().sum() - (g - g.mean()).abs().sum() for g in gs)
    assert abs(float(per_layer) - float(ref.detach())) > 1e-3 * abs(float(ref.detach()))
    # clamp to [0, 1]
    with torch.no_grad():
        bns[0].weight.copy_(torch.linspace(-1.0, 2.0, bns[0].weight.numel()))
    before = bns[0].weight.detach().clone()
    reg.after_step()
    assert torch.equal(bns[0].weight.detach(), before.clamp(0, 1))
    assert all(((b.weight >= 0) & (b.weight <= 1)).all() for b in bns)
    # init 0.5 by default (paper), only on the regularized BNs
    m2 = small_resnet(5)
    r2 = build_regularizer({"name": "polarization", "layers": "prunable"}, m2)
    mods = dict(m2.named_modules())
    assert all((mods[n].weight == 0.5).all() for n in r2.layer_names)
    assert not (mods["bn1"].weight == 0.5).all()


def test_regularizer_follows_dtype_change():
    m = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 1, "width_mult": 0.25})
    reg = build_regularizer({"name": "hgsr"}, m)
    m.double()
    assert reg.penalty().dtype == torch.float64


# --------------------------------------------------------------------------- config and errors


def test_errors_are_user_errors():
    m = small_resnet()
    cases = [
        ({"name": "nope"}, "regularizer.name"),
        ({}, "regularizer.name"),
        ({"name": "hgsr", "lambda": 1}, "regularizer.lambda"),
        ({"name": "l1", "lam": -1}, "regularizer.lam"),
        ({"name": "l1", "lam": "abc"}, "regularizer.lam"),
        ({"name": "l1", "lam": True}, "regularizer.lam"),
        ({"name": "hgsr", "mix": 1.5}, "regularizer.mix"),
        ({"name": "hgsr", "form": "cube"}, "regularizer.form"),
        ({"name": "hgsr", "kernel_norm": "l3"}, "regularizer.kernel_norm"),
        ({"name": "group_lasso", "grouping": "kernel"}, "regularizer.grouping"),
        ({"name": "hgsr", "layers": "some"}, "regularizer.layers"),
        ({"name": "bn_l1", "layers": "all_convs"}, "regularizer.layers"),
        ({"name": "polarization", "t": "x"}, "regularizer.t"),
        ({"name": "polarization", "init_gamma": "big"}, "regularizer.init_gamma"),
        ({"name": "none", "lam": 1}, "regularizer.lam"),
    ]
    for cfg, option in cases:
        with pytest.raises(UserError) as e:
            build_regularizer(cfg, m)
        assert e.value.option == option, (cfg, e.value.option)
    with pytest.raises(UserError):  # prunable on a model without channel groups
        build_regularizer({"name": "hgsr", "layers": "prunable"}, nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(UserError):  # no BN at all
        build_regularizer({"name": "bn_l1"}, nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_yaml_configs_match_registry_and_defaults():
    from omegaconf import OmegaConf

    files = sorted(CONF.glob("*.yaml"))
    assert {f.stem for f in files} == set(REGULARIZERS)
    m = small_resnet()
    for f in files:
        cfg = OmegaConf.load(f)
        assert cfg.name == f.stem
        cls = REGULARIZERS[cfg.name]
        keys = set(cfg) - {"name"}
        assert keys == {o.name for o in cls.options}, f  # every option is in the YAML
        reg = build_regularizer(cfg, m)  # DictConfig accepted
        assert reg.hparams == cls(m, **{}).hparams, f  # YAML values == code defaults
        for line in f.read_text().splitlines():
            if re.match(r"^\w+:", line) and not line.startswith("name:"):
                assert "#" in line, f"{f.name}: no comment on {line!r}"


# --------------------------------------------------------------------------- sparsity statistics


def test_sparsity_stats_hand_made():
    conv = nn.Conv2d(3, 2, 1, bias=False)
    fc = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        # W[o, i] (1x1 kernels): rows o, columns i
        conv.weight.copy_(torch.tensor([[0.5, 0.0, 5e-4], [1e-4, 0.0, 2e-4]]).reshape(2, 3, 1, 1))
        fc.weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    overall, per_layer = sparsity_stats(nn.Sequential(conv, nn.Flatten(), fc))
    c, lin = per_layer
    assert c["layer"] == "0" and c["kind"] == "conv" and lin["layer"] == "2" and lin["kind"] == "linear"
    # conv: |w| < 1e-3 for 5 of 6; feature groups (columns): ||.|| = 0.50000001, 0, 5.39e-4 -> 2 of 3 zero;
    # filter groups (rows): 0.50000025, 2.24e-4 -> 1 of 2 zero
    assert c["n_weights"] == 6 and c["weight_sparsity"] == pytest.approx(5 / 6)
    assert c["n_feature_groups"] == 3 and c["feature_group_sparsity"] == pytest.approx(2 / 3)
    assert c["n_filter_groups"] == 2 and c["filter_group_sparsity"] == pytest.approx(1 / 2)
    # linear: 3 of 4 zero; columns (2, 0) -> 1 of 2; rows (0, 2) -> 1 of 2
    assert lin["weight_sparsity"] == pytest.approx(3 / 4)
    assert lin["feature_group_sparsity"] == pytest.approx(1 / 2) and lin["filter_group_sparsity"] == pytest.approx(
        1 / 2
    )
    assert overall["n_weights"] == 10 and overall["weight_sparsity"] == pytest.approx(8 / 10)
    assert overall["n_feature_groups"] == 5 and overall["feature_group_sparsity"] == pytest.approx(3 / 5)
    assert overall["n_filter_groups"] == 4 and overall["filter_group_sparsity"] == pytest.approx(2 / 4)
    assert overall["conv_n_weights"] == 6 and overall["conv_weight_sparsity"] == pytest.approx(5 / 6)
    assert overall["conv_feature_group_sparsity"] == pytest.approx(2 / 3)
    assert overall["conv_filter_group_sparsity"] == pytest.approx(1 / 2)
    assert overall["zero_threshold"] == 1e-3
    # a different threshold
    overall, _ = sparsity_stats(nn.Sequential(conv, nn.Flatten(), fc), threshold=1e-4 + 1e-9)
    assert overall["weight_sparsity"] == pytest.approx(6 / 10)  # conv: 0, 0, 1e-4; fc: its three 0s


# --------------------------------------------------------------------------- short training runs (digits)


class TinyNet(nn.Module):
    """3 convs + linear on 8x8 digits. ``bn=False``: conv+bias+ReLU (used for the HGSR run, see below)."""

    def __init__(self, width: int = 24, bn: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1, bias=not bn), norm(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=not bn), norm(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=not bn), norm(2 * width)
        self.fc = nn.Linear(2 * width, 10)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # 8x8 -> 4x4
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 8x8, scaled to [0, 1]
    return x, torch.tensor(d.target)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions, and polite on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def train(model, reg_cfg, data, epochs, lr, seed, on_epoch, batch=64):
    x, y = data
    reg = build_regularizer(reg_cfg, model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)  # plain SGD on CE + penalty, no proximal step
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch):
            idx = perm[s : s + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx]) + reg.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            reg.after_step()
        out.append(on_epoch(model))
    return reg, out


def small_group_fraction(model, rel: float = 0.05) -> float:
    """Fraction of feature-wise groups W[:, i] of conv2/conv3 whose L2 norm is < rel x the layer's largest.

    Relative, not absolute 1e-3: with ReLU, scaling one layer by c and the next by 1/c leaves the
    function unchanged, so absolute norms are not comparable across layers or runs; and plain SGD on a
    non-smooth penalty leaves weights jittering around 0 at ~lr*lam instead of landing on exact zeros.
    5% of the layer's largest group is well below anything the unregularized run produces (its smallest
    group stays near half of the largest)."""
    fr = []
    for conv in (model.conv2, model.conv3):
        g = torch.linalg.vector_norm(conv.weight.detach(), dim=(0, 2, 3))
        fr.append((g < rel * g.max()).float())
    return float(torch.cat(fr).mean())


@pytest.mark.slow
def test_hgsr_training_drives_feature_groups_to_zero(digits, one_thread):
    """HGSR (default form: squared, l2 kernels, feature groups, mix 0.5) at lam 1e-3, 10 epochs of SGD.

    The toy net has no BN: after a BN the conv's weight scale is free for the loss, so a weight
    penalty first shrinks whole layers and a short run says little about group selection."""
    fracs = {}
    for name in ("none", "hgsr"):
        torch.manual_seed(0)
        model = TinyNet(24, bn=False)
        cfg = {"name": "hgsr", "lam": 1e-3} if name == "hgsr" else {"name": "none"}
        _, fracs[name] = train(
            model,
            cfg,
            digits,
            epochs=10,
            lr=0.05,
            seed=0,
            on_epoch=lambda m: (small_group_fraction(m, 0.05), small_group_fraction(m, 0.01)),
        )
        with torch.no_grad():
            fracs[name + "_acc"] = float((model(digits[0]).argmax(1) == digits[1]).float().mean())
    h5 = [f[0] for f in fracs["hgsr"]]
    n5 = [f[0] for f in fracs["none"]]
    print(
        "fraction of feature groups < 5% of the layer max, per epoch: hgsr",
        h5,
        "none",
        n5,
        "| < 1%:",
        fracs["hgsr"][-1][1],
        fracs["none"][-1][1],
        "| train acc",
        fracs["hgsr_acc"],
        fracs["none_acc"],
    )
    assert max(n5) == 0.0  # the unregularized run never has such a group
    assert h5[0] == 0.0 and h5[-1] >= 0.2  # grows from none to a large fraction
    assert h5[-1] >= max(h5[:5]) + 0.15  # ... over the epochs
    assert fracs["hgsr"][-1][1] > 0.0 == fracs["none"][-1][1]  # some groups even below 1% of the layer max
    assert fracs["hgsr_acc"] > 0.5  # and the network still works


@pytest.mark.slow
def test_polarization_training_is_bimodal(digits, one_thread):
    torch.manual_seed(0)
    model = TinyNet(24, bn=True)

    def gammas(m):
        return torch.cat([b.weight.detach() for b in m.modules() if isinstance(b, nn.BatchNorm2d)])

    reg, hist = train(model, {"name": "polarization", "lam": 2e-2}, digits, epochs=6, lr=0.05, seed=0, on_epoch=gammas)
    assert reg.hparams["init_gamma"] == 0.5  # all gammas started at 0.5: a single mode
    g = hist[-1]
    n = g.numel()
    counts = torch.histc(g, bins=20, min=0.0, max=1.0)  # 0.05-wide bins
    print("gamma histogram (0.05 bins):", counts.int().tolist())
    assert g.min() >= 0 and g.max() <= 1  # clamped every step
    low, high = float((g < 0.05).sum()) / n, float((g >= 0.5).sum()) / n
    assert low >= 0.25 and high >= 0.15  # a mass at 0 and a mass away from 0
    # a valley between them: some 0.1-wide window in [0.1, 0.9] holds < 3% of the gammas
    windows = [float(((g >= a) & (g < a + 0.1)).sum()) / n for a in torch.arange(0.1, 0.81, 0.05).tolist()]
    assert min(windows) < 0.03
    # the mass at 0 builds up over the epochs
    lows = [float((h < 0.05).sum()) / n for h in hist]
    print("fraction of gammas < 0.05 per epoch:", lows)
    assert lows[0] < low and lows[-1] >= max(lows[:3])
