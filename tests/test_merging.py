"""Neuron Merging: the merge matrix against an explicit loop over the official formulas and the exact BN relation,
exactness where a removed filter is a positive multiple of a kept one, masked == physical after merging."""

import copy
import math

import pytest
import torch
from torch import nn

from helpers import calibrated
from prune_cli.methods.merging import merge_matrix, merge_removed
from prune_cli.models import build_model
from prune_cli.structure.channels import mask_channels, prune_channels


def loop_merge_matrix(weight, kept, bn, lam, threshold, bn_form):
    """The merge matrix by explicit loops over removed and kept filters, in Python floats."""
    w = [[float(v) for v in row] for row in weight.flatten(1)]
    g, b = bn.weight.tolist(), bn.bias.tolist()
    mu, var = bn.running_mean.tolist(), bn.running_var.tolist()
    norm = [math.sqrt(sum(v * v for v in row)) for row in w]
    z = [[0.0] * len(kept) for _ in w]
    for i, k in enumerate(kept):
        z[k][i] = 1.0
    for p in range(len(w)):
        if p in kept:
            continue
        cos, scale, bias = [], [], []
        for k in kept:
            c = sum(a * b_ for a, b_ in zip(w[p], w[k])) / (norm[p] * norm[k])
            s = norm[p] / norm[k]
            if bn_form == "official":
                a = s * (g[k] / g[p]) * (var[p] / var[k])
                d = abs((g[k] / var[k]) * (s * (-(var[p] * b[p] / g[p]) + mu[p]) - mu[k]) + b[k]) / a
            else:
                sp, sk = math.sqrt(var[p] + bn.eps), math.sqrt(var[k] + bn.eps)
                a = s * g[p] * sk / (g[k] * sp)
                shift = b[p] - a * b[k] + g[p] * (s * mu[k] - mu[p]) / sp
                d = abs(shift) / a if a > 0 else math.inf
            cos.append(c), scale.append(a), bias.append(d)
        finite = [d for d in bias if d != math.inf]
        if not finite:  # no candidate can merge (exact form: every z <= 0)
            continue
        lo, hi = min(finite), max(finite)
        spread = hi - lo if hi > lo else math.inf  # all bias terms equal: they do not discriminate
        scores = [
            lam * (1 - c) + (1 - lam) * (d - lo) / spread if d != math.inf else math.inf for c, d in zip(cos, bias)
        ]
        best = min(range(len(kept)), key=lambda i: scores[i])
        if cos[best] >= threshold:
            z[p][best] = scale[best]
    return torch.tensor(z, dtype=torch.float64)


def random_bn(n, seed, negative_gamma=False):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(n)
    with torch.no_grad():
        bn.weight.uniform_(0.3, 1.5)
        if negative_gamma:
            bn.weight[::3] *= -1
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 2.0)
    return bn


@pytest.mark.parametrize("bn_form", ["official", "exact"])
@pytest.mark.parametrize("threshold", [-1.0, 0.1])
def test_merge_matrix_equals_the_loop(bn_form, threshold):
    torch.manual_seed(0)
    weight = torch.randn(9, 4, 3, 3)
    weight[5] = 0.7 * weight[1] + 0.1 * torch.randn(4, 3, 3)  # one close pair, and mostly unrelated filters
    kept = torch.tensor([0, 1, 3, 6])
    bn = random_bn(9, 1, negative_gamma=bn_form == "exact")
    got = merge_matrix(weight, kept, bn, 0.85, threshold, bn_form)
    want = loop_merge_matrix(weight, kept.tolist(), bn, 0.85, threshold, bn_form)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert (got[[2, 4, 5, 7, 8]] != 0).any(1).sum() >= 1  # something merged: the check compares real numbers
    if threshold > 0:  # the threshold really cuts: a dissimilar filter stays unmerged
        assert (got[[2, 4, 5, 7, 8]] == 0).all(1).any()


def test_without_batchnorm_the_match_is_the_most_similar_filter():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.3], [-1.0, 0.0]])
    z = merge_matrix(weight, torch.tensor([0, 1]), None, 0.85, 0.1, "official")
    want = torch.tensor([[1, 0], [0, 1], [math.hypot(3, 0.3), 0], [0, 0]], dtype=torch.float64)
    torch.testing.assert_close(z, want)  # row 2 into filter 0 with ||W_2|| / ||W_0||; row 3 (cos -1) unmerged


def make_multiple(model, group, p, k, s):
    """Set the group's filter p to s times filter k and its BN so that BN_p(conv_p) = z BN_k(conv_k) exactly."""
    modules = dict(model.named_modules())
    conv, bn = modules[group.conv], modules[group.bn]
    with torch.no_grad():
        conv.weight[p] = s * conv.weight[k]
        sigma = torch.sqrt(bn.running_var + bn.eps)
        z = s * bn.weight[p] * sigma[k] / (bn.weight[k] * sigma[p])
        bn.bias[p] = z * bn.bias[k] - bn.weight[p] * (s * bn.running_mean[k] - bn.running_mean[p]) / sigma[p]


@pytest.mark.parametrize(
    "arch,shape,pairs",
    [
        # VGG: a conv feeding a conv, and the last conv feeding the first linear layer of the 512-512-10 head
        (
            dict(name="vgg11", widths=[6, 8, 8, 8, 8, 8, 8, 6], head="li", last_maxpool=False),
            (3, 16, 16),
            {1: (3, 5), 7: (2, 0)},
        ),
        # ResNet: a block's first conv, merged through its second
        (dict(name="resnet20", width_mult=0.5, shortcut="B"), (3, 8, 8), {0: (1, 4), 4: (6, 2)}),
    ],
)
def test_merging_is_exact_for_positive_multiples(arch, shape, pairs):
    model = build_model(dict(num_classes=5, in_channels=3, **arch))
    model = calibrated(model, shape)
    groups = model.channel_groups()
    keep = [torch.ones(w, dtype=torch.bool) for w in model.widths]
    for g, (p, k) in pairs.items():
        make_multiple(model, groups[g], p, k, s=1.7)
        keep[g][p] = False
    x = torch.randn(4, *shape)
    with torch.no_grad():
        dense = model(x)
        plain = prune_channels(model, keep)(x)
        merged_model = copy.deepcopy(model)
        assert merge_removed(merged_model, keep, 0.85, 0.1, "exact") == len(pairs)
        merged = prune_channels(merged_model, keep)(x)
        official_model = copy.deepcopy(model)
        merge_removed(official_model, keep, 0.85, 0.1, "official")
        official = prune_channels(official_model, keep)(x)
    torch.testing.assert_close(merged, dense, rtol=1e-4, atol=1e-4)
    assert (plain - dense).abs().max() > 1e-2  # pruning alone changes the outputs ...
    assert (official - dense).abs().max() > 1e-3  # ... and the official BN terms are not the exact relation


def test_merged_network_masked_equals_physical():
    model = calibrated(
        build_model(dict(name="vgg11", num_classes=5, in_channels=3, width_mult=0.125, head="li")), (3, 16, 16)
    )
    torch.manual_seed(3)
    keep = [torch.rand(w) > 0.4 for w in model.widths]
    for k in keep:
        k[0] = True
    merge_removed(model, keep, 0.85, -1.0, "official")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        physical = prune_channels(model, keep)(x)
        mask_channels(model, keep)
        masked = model(x)
    torch.testing.assert_close(physical, masked, rtol=1e-4, atol=1e-4)
