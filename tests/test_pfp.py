"""Provable Filter Pruning: the sensitivity against explicit loops over images, input parts, filters, positions,
channels and taps; |S| from output units counted by hand (ResNet-56: 186, VGG-16: 188); the allocation
against the formulas written out per layer, and the solved eps against a scan of all eps; the randomized
choice's draw count, distinct count and unbiased reweighting by Monte Carlo."""

import copy
import math

import pandas as pd
import pytest
import torch
from torch import nn

from helpers import TINY, calibrated
from helpers import compose_config as config
from prune_cli.methods import pfp
from prune_cli.models import build_model
from prune_cli.run import pipeline
from prune_cli.structure.channels import mask_channels, prune_channels
from prune_cli.structure.counting import count_macs, count_params, layer_pixels

EPS32 = float(torch.finfo(torch.float32).eps)


# ------------------------------------------------------------------------------------------ sensitivity


def loop_conv_sensitivity(weight, x, stride, padding, dilation):
    """s_j by explicit loops: images, a+ / a-, filters, output positions, W+ / W-, channels and taps."""
    w = weight.tolist()
    nf, nc, kh, kw = weight.shape
    s = [0.0] * nc
    for img in x.tolist():
        h, wd = len(img[0]), len(img[0][0])
        ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
        wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
        for sign_a in (1.0, -1.0):
            for f in range(nf):
                for oh in range(ho):
                    for ow in range(wo):
                        taps = []  # (channel, weight, input) of every tap at this position
                        for j in range(nc):
                            for u in range(kh):
                                for v in range(kw):
                                    r = oh * stride - padding + u * dilation
                                    c = ow * stride - padding + v * dilation
                                    a = max(sign_a * img[j][r][c], 0.0) if 0 <= r < h and 0 <= c < wd else 0.0
                                    taps.append((j, w[f][j][u][v], a))
                        for positive in (True, False):
                            part = [(j, wv, a) for j, wv, a in taps if (wv > 0 if positive else wv < 0)]
                            z = sum(wv * a for _, wv, a in part)
                            if abs(z) <= EPS32:
                                continue
                            for j, wv, a in part:
                                s[j] = max(s[j], wv * a / z)
    return torch.tensor(s, dtype=torch.float64)


def loop_linear_sensitivity(weight, x):
    w = weight.tolist()
    s = [0.0] * weight.shape[1]
    for row in x.tolist():
        for sign_a in (1.0, -1.0):
            a = [max(sign_a * v, 0.0) for v in row]
            for wf in w:
                for positive in (True, False):
                    part = [j for j, wv in enumerate(wf) if (wv > 0 if positive else wv < 0)]
                    z = sum(wf[j] * a[j] for j in part)
                    if abs(z) <= EPS32:
                        continue
                    for j in part:
                        s[j] = max(s[j], wf[j] * a[j] / z)
    return torch.tensor(s, dtype=torch.float64)


@pytest.mark.parametrize(
    "stride,padding,dilation,size", [(1, 1, 1, 4), (2, 1, 1, 4), (2, 1, 1, 5), (1, 0, 1, 4), (1, 2, 2, 5)]
)
def test_conv_sensitivity_equals_loops(stride, padding, dilation, size):
    torch.manual_seed(stride * 100 + padding * 10 + size)
    conv = nn.Conv2d(3, 2, 3, stride=stride, padding=padding, dilation=dilation, bias=True)
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[0, 1, 1, 1] = 0.0
        conv.bias.fill_(5.0)  # the bias takes no part in z
    x = torch.randn(2, 3, size, size)  # mixed signs: both a+ and a- count
    x[1, 2] = x[1, 2].abs()
    expected = loop_conv_sensitivity(conv.weight.double(), x.double(), stride, padding, dilation)
    s64 = pfp.input_sensitivity(conv, x, dtype=torch.float64)
    assert s64.dtype == torch.float64 and s64.shape == (3,)
    torch.testing.assert_close(s64, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(pfp.input_sensitivity(conv, x), expected, rtol=1e-5, atol=0)
    # chunking over filters and positions changes nothing
    torch.testing.assert_close(pfp.input_sensitivity(conv, x, dtype=torch.float64, max_elements=5), s64)
    # images combine by maximum
    parts = torch.maximum(*(pfp.input_sensitivity(conv, x[i : i + 1], dtype=torch.float64) for i in range(2)))
    torch.testing.assert_close(parts, s64)


def test_linear_sensitivity_equals_loops():
    torch.manual_seed(1)
    layer = nn.Linear(5, 3)
    with torch.no_grad():
        layer.weight[2, 4] = 0.0
    x = torch.randn(4, 5)
    expected = loop_linear_sensitivity(layer.weight.double(), x.double())
    torch.testing.assert_close(pfp.input_sensitivity(layer, x, dtype=torch.float64), expected, rtol=1e-12, atol=0)
    # leading dims are samples
    torch.testing.assert_close(pfp.input_sensitivity(layer, x.view(2, 2, 5), dtype=torch.float64), expected)


def test_sensitivity_tiny_denominator_counts_as_infinity():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.5, -1.0], [0.25, 2.0, 1.0]]))
    x = torch.tensor([[1e-9, 0.0, 0.0]])  # z = w a <= eps_float32 in every pair: g = 0, not 1
    assert pfp.input_sensitivity(layer, x).tolist() == [0.0, 0.0, 0.0]
    x = torch.tensor([[1e-3, 0.0, 0.0]])  # the only term of z: g = w a / z = 1
    assert pfp.input_sensitivity(layer, x, dtype=torch.float64).tolist() == [1.0, 0.0, 0.0]


def test_sensitivity_refuses_grouped_convs():
    with pytest.raises(ValueError, match="groups"):
        pfp.input_sensitivity(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="padding"):
        pfp.input_sensitivity(nn.Conv2d(2, 2, 3, padding="same"), torch.randn(1, 2, 5, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sensitivity_cuda_equals_cpu():
    torch.manual_seed(2)
    conv, x = nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 6, 6)
    cpu = pfp.input_sensitivity(conv, x, dtype=torch.float64)
    gpu = pfp.input_sensitivity(conv.cuda(), x.cuda(), dtype=torch.float64)
    torch.testing.assert_close(gpu.cpu(), cpu)


# ------------------------------------------------------------------------------------------------- |S|


def resnet_units(blocks, shortcut_convs=False):
    """CIFAR ResNet (6n+2), 32x32: stem, 3 stages of `blocks` blocks (two 3x3 convs each), the classifier."""
    units = [16 * 32 * 32]
    for width, size in ((16, 32), (32, 16), (64, 8)):
        units += [width * size * size] * (2 * blocks)
        if shortcut_convs and width > 16:
            units.append(width * size * size)
    return units + [10]


def vgg16_units(head=(10,)):
    units, size = [], 32
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if v == "M":
            size //= 2
        else:
            units.append(v * size * size)
    return units + list(head)


def test_sample_size_resnet56_and_vgg16():
    r56, vgg = resnet_units(9), vgg16_units()
    assert (sum(r56), max(r56), len(r56)) == (532490, 16384, 56)
    assert (sum(vgg), max(vgg), len(vgg)) == (276490, 65536, 14)
    # 3 ln(8 eta_max eta / 1e-16): 185.43 and 187.62
    assert 3 * math.log(8 * 16384 * 532490 / 1e-16) == pytest.approx(185.4305, abs=1e-4)
    assert pfp.sample_size(r56, 10**9) == 186
    assert pfp.sample_size(vgg, 10**9) == 188
    # neither projection shortcuts nor a 512-512-10 head moves the count
    assert pfp.sample_size(resnet_units(9, shortcut_convs=True), 10**9) == 186
    assert pfp.sample_size(vgg16_units(head=(512, 512, 10)), 10**9) == 188
    # the cap: half of the validation split (CIFAR: 10% of 50,000 training images)
    assert pfp.sample_cap(5000) == 2500 and pfp.sample_cap(5) == 3
    assert pfp.sample_size(r56, pfp.sample_cap(5000)) == 186
    assert pfp.sample_size(r56, 100) == 100


def test_output_units_of_the_models():
    for name, hand in (("resnet56", resnet_units(9)), ("vgg16", vgg16_units())):
        model = build_model({"name": name, "num_classes": 10, "in_channels": 3}).eval()
        assert sorted(pfp.output_units(model, torch.zeros(2, 3, 32, 32))) == sorted(hand)


# ------------------------------------------------------------------------------------------- allocation

POSITIONS, KERNELS, CIN, COUT = [64, 64, 16, 1], [9, 9, 9, 1], [3, 8, 8, 16], [8, 8, 16, 5]


def sensitivities(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = [torch.rand(c, generator=g, dtype=torch.float64) ** 3 for c in CIN]
    s[1][2] = 0.0  # a channel no image reaches
    return s


def loop_allocation(eps, sens, producers=None, prunable=None):
    """n_l, out_l, m_l and the size, from the formulas one layer at a time."""
    n_layers = len(CIN)
    producers = [None, *range(n_layers - 1)] if producers is None else producers
    prunable = [True] * n_layers if prunable is None else prunable
    kept, samples = [], []
    for s, p, k, c, ok in zip(sens, POSITIONS, KERNELS, CIN, prunable):
        if not ok:
            kept.append(c)
            samples.append(0.0)
            continue
        s = s.tolist()
        total = math.fsum(s)
        big_c = 6 * math.log(8 * (p + 1) * k / 1e-16) * total
        m = max(1, math.ceil(3 * (6 + 2 * eps) * big_c / eps**2))
        assert m >= 2  # away from m = 1, where the expected count is 1 up to rounding
        expected = math.fsum(1 - (1 - sj / total) ** m for sj in s)
        kept.append(min(c, max(1, math.ceil(expected))))
        samples.append(float(m))
    out = list(COUT)
    for ell in range(n_layers):
        if producers[ell] is not None and prunable[ell]:
            out[producers[ell]] -= CIN[ell] - kept[ell]
    out = [max(1, o) for o in out]
    return kept, out, sum(n * o * k for n, o, k in zip(kept, out, KERNELS)), samples


def test_alpha_and_layer_constant():
    assert pfp.alpha(1024, 9) == pytest.approx(6 * (math.log(8 * 1025 * 9) + 16 * math.log(10)), rel=1e-14)
    s = torch.tensor([0.5, 0.25, 0.0])
    assert pfp.layer_constant(s, 1, 1) == pytest.approx(0.75 * 6 * math.log(16 / 1e-16), rel=1e-14)


@pytest.mark.parametrize("eps", [30.0, 60.0, 120.0, 250.0])
def test_allocation_at_eps_equals_formulas(eps):
    sens = sensitivities()
    got = pfp.allocation_at(eps, sens, POSITIONS, KERNELS, CIN, COUT)
    kept, out, size, samples = loop_allocation(eps, sens)
    assert (got.kept, got.out, got.size) == (kept, out, size)
    assert got.samples == samples


def test_allocation_formulas_cover_partial_layers():
    # the eps above leave some layers partly kept (not only all or one channel)
    partial = {
        ell
        for eps in (30.0, 60.0, 120.0, 250.0)
        for ell, (n, c) in enumerate(zip(loop_allocation(eps, sensitivities())[0], CIN))
        if 1 < n < c
    }
    assert len(partial) >= 3


def test_allocation_fixed_inputs_and_producers():
    sens = sensitivities(1)
    producers, prunable = [None, None, 1, None], [False, False, True, False]  # like a residual block
    for eps in (60.0, 250.0):
        got = pfp.allocation_at(eps, sens, POSITIONS, KERNELS, CIN, COUT, producers=producers, prunable=prunable)
        kept, out, size, _ = loop_allocation(eps, sens, producers, prunable)
        assert (got.kept, got.out, got.size) == (kept, out, size)
        assert got.kept[0] == 3 and got.kept[1] == 8 and got.kept[3] == 16 and got.out[0] == 8
    with pytest.raises(ValueError, match="same producer"):
        pfp.allocation_at(1.0, sens, POSITIONS, KERNELS, CIN, COUT, producers=[None, 0, 0, 2])


def test_allocation_of_a_layer_without_sensitivity_keeps_one_channel():
    sens = sensitivities()
    sens[2] = torch.zeros(8, dtype=torch.float64)
    assert pfp.allocation_at(1e-3, sens, POSITIONS, KERNELS, CIN, COUT).kept[2] == 1


def test_allocate_meets_the_budget_as_near_as_any_eps():
    sens = sensitivities()
    scan = {pfp.allocation_at(float(e), sens, POSITIONS, KERNELS, CIN, COUT).size for e in torch.logspace(0, 5, 2000)}
    assert max(scan) == pfp.allocation_at(1e-300, sens, POSITIONS, KERNELS, CIN, COUT).size
    assert min(scan) == 3 * (1 * 1 * 9) + 1 * 5 * 1  # one channel per layer, even the image input
    for budget in (100, 400, 800, 1200, 1700):
        got = pfp.allocate(sens, POSITIONS, KERNELS, CIN, COUT, budget)
        assert got.in_range
        assert got == pfp.allocation_at(got.eps, sens, POSITIONS, KERNELS, CIN, COUT)
        assert abs(got.size - budget) <= min(abs(v - budget) for v in scan)
        under = pfp.allocate(sens, POSITIONS, KERNELS, CIN, COUT, budget, side="under")
        over = pfp.allocate(sens, POSITIONS, KERNELS, CIN, COUT, budget, side="over")
        assert under.size <= budget <= over.size and got.size in (under.size, over.size)
        assert not any(under.size < v < over.size for v in scan)  # neighbouring steps


def test_allocate_outside_the_reachable_range():
    sens = sensitivities()
    full = sum(c * o * k for c, o, k in zip(CIN, COUT, KERNELS))
    got = pfp.allocate(sens, POSITIONS, KERNELS, CIN, COUT, 10 * full)
    assert (got.eps, got.kept, got.size, got.in_range) == (1e-300, [3, 7, 8, 16], got.size, False)
    assert got.size == full - 1 * 8 * 9 - 3 * 1 * 9  # channel 2 of layer 1 (s = 0) goes, with its filter
    got = pfp.allocate(sens, POSITIONS, KERNELS, CIN, COUT, 0)
    assert (got.eps, got.kept, got.out, got.in_range) == (1e150, [1, 1, 1, 1], [1, 1, 1, 5], False)


# ---------------------------------------------------------------------------------------- channel choice


def test_keep_top_against_sorting():
    s = torch.tensor([0.2, 0.5, 0.2, 0.1, 0.5, 0.3])
    for n in range(7):
        order = sorted(range(6), key=lambda j: (-s[j].item(), j))[:n]
        assert pfp.keep_top(s, n).nonzero().flatten().tolist() == sorted(order)


def loop_expected(p, m):
    return math.fsum(1 - (1 - pj) ** m for pj in p if pj > 0)


def test_draws_for_distinct():
    p = pfp.probabilities(torch.tensor([0.05, 0.3, 0.1, 0.6, 0.02, 0.2, 0.4, 0.15]))
    for n in range(2, 9):
        m = pfp.draws_for_distinct(p, n)
        target = min(n, 7)  # at most nnz - 1, as the official solver
        assert math.ceil(loop_expected(p.tolist(), m)) >= target > math.ceil(loop_expected(p.tolist(), m - 1))
    assert pfp.draws_for_distinct(p, 1) == 1 and pfp.draws_for_distinct(p, 0) == 0
    assert pfp.draws_for_distinct(torch.tensor([1.0]), 3) == 3
    assert pfp.draws_for_distinct(torch.tensor([0.0, 1.0, 0.0]), 2) == 1


def test_probabilities_drop_float32_eps():
    p = pfp.probabilities(torch.tensor([1.0, 1e-8, 3.0], dtype=torch.float64))
    total = 4.0 + 1e-8  # the sum keeps the dropped channel's share, as the official code
    assert p.tolist() == pytest.approx([1.0 / total, 0.0, 3.0 / total], rel=1e-15)
    assert pfp.probabilities(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_keep_sampled_distinct_count_and_unbiased_output():
    torch.manual_seed(3)
    layer = nn.Linear(6, 4, bias=False)
    s = pfp.input_sensitivity(layer, torch.rand(8, 6), dtype=torch.float64)
    p = pfp.probabilities(s)
    assert bool((p > 0).all())
    n, draws = 3, 2000
    m = pfp.draws_for_distinct(p, n)
    x = torch.rand(6, dtype=torch.float64)
    w = layer.weight.detach().double()
    gen = torch.Generator().manual_seed(0)
    distinct, outputs, scales = [], [], []
    for _ in range(draws):
        mask, scale = pfp.keep_sampled(s, n, gen)
        assert torch.equal(mask, scale > 0)
        distinct.append(mask.sum().item())
        scales.append(scale)
        outputs.append(w @ (scale * x))  # W[:, j] scaled by scale[j]
    counts = torch.stack(scales) * m * p  # the scale is count / (m' p): whole counts summing to m'
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-9)
    assert bool((counts.sum(1).round() == m).all())
    expected = loop_expected(p.tolist(), m)
    assert n - 1 < expected <= n + 1e-12
    d = torch.tensor(distinct, dtype=torch.float64)
    assert abs(d.mean().item() - expected) < 5 * d.std().item() / math.sqrt(draws)
    for values, truth in ((torch.stack(outputs), w @ x), (torch.stack(scales), torch.ones(6, dtype=torch.float64))):
        err = (values.mean(0) - truth).abs()
        assert bool((err < 5 * values.std(0) / math.sqrt(draws) + 1e-12).all())


def test_keep_top_sampled_keeps_the_heavy_channels_and_is_unbiased():
    s = torch.tensor([4.0, 0.3, 0.2, 2.5, 0.1, 0.25, 0.15, 0.2], dtype=torch.float64)
    n = 4
    p = (s / s.sum()).tolist()
    m = pfp.draws_for_distinct(torch.tensor(p), n)
    heavy = [j for j in range(8) if p[j] >= 1 / m]
    assert heavy == [0, 3]
    gen = torch.Generator().manual_seed(1)
    scales = torch.stack([pfp.keep_top_sampled(s, n, gen)[1] for _ in range(1000)])
    assert bool((scales[:, heavy] == 1.0).all())
    err = (scales.mean(0) - 1).abs()
    assert bool((err < 5 * scales.std(0) / math.sqrt(1000) + 1e-12).all())
    mask, scale = pfp.keep_top_sampled(s, 1, gen)
    assert mask.nonzero().flatten().tolist() == [0] and scale[0] == 1.0


# ---------------------------------------------------------------------------------------------- the stage


def planned(arch, shape, budget_share, variant="deterministic"):
    """A calibrated model and its PFP plan for ``budget_share`` of its conv/linear weights."""
    model = calibrated(build_model(dict(num_classes=5, in_channels=3, **arch)), shape)
    layers, pixels = pfp.pfp_layers(model, shape, set())
    sens = pfp.sensitivities(model, layers, torch.randn(6, *shape), 4)
    problem = pfp.layer_problem(layers, sens, pixels)
    allocation = pfp.allocate(
        **problem, budget=int(budget_share * sum(layer.module.weight.numel() for layer in layers))
    )
    plan = pfp.make_plan(model, layers, sens, allocation, variant, 1, 0)
    plan.sens = sens
    return model, layers, plan


@pytest.mark.parametrize(
    "arch,shape",
    [
        (dict(name="resnet20", width_mult=0.5, shortcut="B"), (3, 8, 8)),
        (dict(name="vgg11", width_mult=0.125, head="li"), (3, 16, 16)),
    ],
)
def test_pruned_and_gathered_equals_masked(arch, shape):
    """Removing the groups' channels and gathering the other layers' inputs gives the outputs of the dense
    network with those filters (and BN entries) and those input columns set to zero."""
    model, layers, plan = planned(arch, shape, 0.4)
    assert plan.gathers and any(not k.all() for k in plan.keep)  # both mechanisms act
    pruned = pfp.apply_gathers(prune_channels(model, plan.keep), plan.gathers)
    masked = copy.deepcopy(model)
    mask_channels(masked, plan.keep)
    with torch.no_grad():
        for name, inputs in plan.gathers.items():
            weight = masked.get_submodule(name).weight
            drop = torch.ones(weight.shape[1], dtype=torch.bool)
            drop[inputs] = False
            weight[:, drop] = 0
    x = torch.randn(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-4)
        rebuilt = build_model(pruned.arch)  # a checkpoint's arch rebuilds the gathers
        rebuilt.load_state_dict(pruned.state_dict())
        torch.testing.assert_close(rebuilt.eval()(x), pruned(x))


def test_gathered_layers_are_counted_exactly():
    """Params and MACs of the pruned network against a hand count: every conv/linear layer as
    out x in x k (x output positions), with the kept widths and the gathered inputs."""
    shape = (3, 8, 8)
    model, layers, plan = planned(dict(name="resnet20", width_mult=0.5, shortcut="B"), shape, 0.3)
    pruned = pfp.apply_gathers(prune_channels(model, plan.keep), plan.gathers)
    widths = [int(k.sum()) for k in plan.keep]
    groups = model.channel_groups()
    width_of = {g.conv: w for g, w in zip(groups, widths)}
    in_of = {c: w for g, w in zip(groups, widths) for c in g.consumers}
    pixels = layer_pixels(model, shape)
    hand_params = hand_macs = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            out = width_of.get(name, module.weight.shape[0])
            inputs = len(plan.gathers[name]) if name in plan.gathers else in_of.get(name, module.weight.shape[1])
            weights = out * inputs * math.prod(module.weight.shape[2:])
            hand_params += weights + (out if module.bias is not None else 0)
            hand_macs += weights * pixels[name]
        elif isinstance(module, nn.BatchNorm2d):
            hand_params += 2 * width_of.get(name.replace("bn", "conv"), module.num_features)
        elif isinstance(module, nn.BatchNorm1d):
            hand_params += 2 * module.num_features
    assert count_macs(pruned, shape) == hand_macs
    assert count_params(pruned) == hand_params
    for target, hand in (("params", hand_params), ("macs", hand_macs)):  # the stage's count, without building
        amount = pfp.Amount(model, shape, layers, pixels, target)
        assert amount(widths, plan.gathers) == hand


def test_deterministic_keeps_the_most_sensitive_inputs():
    model, layers, plan = planned(dict(name="resnet20", width_mult=0.5), (3, 8, 8), 0.5)
    for layer, s, n in zip(layers, plan.sens, plan.allocation.kept):
        kept = plan.keep[layer.group] if layer.group is not None else None
        if kept is not None and n < len(s):
            assert int(kept.sum()) == n
            assert s[kept].min() >= s[~kept].max()  # by an independent comparison, not keep_top


def test_randomized_variant_reweights_the_kept_inputs():
    model, layers, plan = planned(dict(name="resnet20", width_mult=0.5), (3, 8, 8), 0.5, "randomized")
    assert plan.scales
    for name, scale in plan.scales.items():
        layer = next(layer for layer in layers if layer.name == name)
        kept = plan.keep[layer.group] if layer.group is not None else None
        if kept is not None:
            assert torch.equal(scale > 0, kept)  # a kept channel has a weight, a dropped one none


def test_geometric_cascade_keeps_equal_ratios():
    from prune_cli.stages.prune import kept_share

    assert [kept_share(0.75, k, 2, "geometric") for k in (1, 2)] == [0.5, 0.25]
    assert [kept_share(0.75, k, 3, "linear") for k in (1, 2, 3)] == [0.75, 0.5, 0.25]


@pytest.mark.slow
def test_pfp_cascade_run(tmp_path):
    """schedule=pfp with two geometric steps retrained with the finetune block's own settings: the removed share
    of params meets the target, the step's retraining is the finetune block's, the row names the sample."""
    cfg = config(
        *TINY,
        "model=resnet20",
        "model.width_mult=0.5",
        "schedule=pfp",
        "schedule.pretrain.epochs=1",
        "schedule.finetune.epochs=1",
        "prune.ratio=0.5",
        "prune.steps=2",
        "prune.step_grid=geometric",
        "prune.step_epochs=null",
        "prune.step_lr=null",
        "prune.tolerance=0.02",
    )
    rows = pipeline.run(cfg, tmp_path)
    dense, pruned = rows[1], rows[2]
    assert pruned["stage"] == "pfp" and abs(1 - pruned["params"] / dense["params"] - 0.5) < 0.02
    assert pruned["pfp_variant"] == "deterministic" and pruned["pfp_images"] == 5  # ceil(0.5 * floor(96 / 10))
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics["stage"]).count("pfp_step1") == 1
