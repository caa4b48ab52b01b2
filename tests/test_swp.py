"""Stripe-wise pruning: the skeleton's per-step rule against explicit loops, the stripe form against the masked
k x k conv, its counting by hand, and the pruned stripe network against the masked one (VGG, ResNet A and B,
with a block reduced to its shortcut)."""

import pytest
import torch
import torch.nn.functional as F

from prune_cli.methods.swp import FilterSkeleton, alive_stripes, break_into_stripes, dead_filter_keep
from prune_cli.models import build_model
from prune_cli.models.layers import SkeletonConv, StripeConv, stripe_positions
from prune_cli.structure.channels import prune_channels
from prune_cli.structure.counting import count_macs, count_params


def tiny(name, **extra):
    return build_model({"name": name, "num_classes": 5, "in_channels": 3, "width_mult": 0.25, **extra})


def test_skeleton_step_equals_explicit_loops():
    torch.manual_seed(0)
    model = tiny("vgg11")
    reg = FilterSkeleton(model, alpha=0.3, threshold=0.2, zero_dead_bn=True, init_gamma=None, init_linear_std=None)
    conv, bn = model.features[0], model.features[1]
    assert isinstance(conv, SkeletonConv)
    with torch.no_grad():
        conv.skeleton.uniform_(-0.5, 0.5)
        conv.skeleton[2] = 0.1  # filter 2: every entry at or below the threshold, so the filter dies
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    for p in (conv.skeleton, bn.weight, bn.bias):
        p.grad = torch.randn_like(p)
    s0, g0 = conv.skeleton.detach().clone(), conv.skeleton.grad.clone()
    w0, wg0, b0 = bn.weight.detach().clone(), bn.weight.grad.clone(), bn.bias.detach().clone()
    reg.before_step()
    for o in range(s0.shape[0]):
        for i in range(3):
            for j in range(3):
                s, g = s0[o, i, j].item(), g0[o, i, j].item()
                g = g + 0.3 * (1 if s > 0 else -1 if s < 0 else 0)
                if abs(s) <= 0.2:
                    s, g = 0.0, 0.0
                assert conv.skeleton[o, i, j].item() == pytest.approx(s)
                assert conv.skeleton.grad[o, i, j].item() == pytest.approx(g, abs=1e-6)
        dead = all(abs(s0[o, i, j].item()) <= 0.2 for i in range(3) for j in range(3))
        assert bn.weight[o].item() == (0.0 if dead else pytest.approx(w0[o].item()))
        assert bn.weight.grad[o].item() == (0.0 if dead else pytest.approx(wg0[o].item()))
        assert bn.bias[o].item() == (0.0 if dead else pytest.approx(b0[o].item()))
    assert bn.weight[2].item() == 0.0


@pytest.mark.parametrize("stride,padding,size", [(1, 1, 7), (2, 1, 8), (2, 1, 7), (1, 0, 6), (2, 0, 9)])
def test_stripe_conv_equals_masked_conv(stride, padding, size):
    torch.manual_seed(stride * 10 + size)
    w = torch.randn(6, 4, 3, 3)
    mask = torch.rand(6, 3, 3) < 0.5
    mask[1] = False  # a filter with no stripe: its output channel is zero
    conv = StripeConv(4, 6, 3, stripe_positions(mask), stride, padding)
    rows = w.permute(2, 3, 0, 1).reshape(-1, 4)  # (i, j, o) order, as the positions
    with torch.no_grad():
        conv.weight.copy_(rows[conv.positions].view_as(conv.weight))
    x = torch.randn(2, 4, size, size)
    expected = F.conv2d(x, w * mask.unsqueeze(1), stride=stride, padding=padding)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    # counting: n stripes x C_in weights, each at H_out x W_out output positions
    n, h_out = int(mask.sum()), (size + 2 * padding - 3) // stride + 1
    assert count_params(conv) == n * 4
    assert count_macs(conv, (4, size, size)) == n * 4 * h_out * h_out


def calibrated_skeleton_model(name, seed, **extra):
    """A model with skeletons, random dead stripes and filters, realistic BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = tiny(name, **extra)
    reg = FilterSkeleton(model, alpha=0.0, threshold=0.01, zero_dead_bn=True, init_gamma=None, init_linear_std=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SkeletonConv):
                m.skeleton.uniform_(0.5, 1.5).mul_(torch.rand_like(m.skeleton) < 0.6)
                m.skeleton[0] = 0  # one dead filter in every conv
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
        if name.startswith("resnet"):
            model.layers[0][1].conv2.skeleton.zero_()  # conv2 with no stripe: the block keeps its shortcut
            model.layers[1][0].conv1.skeleton.zero_()  # a downsampling block whose conv1 died whole
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    reg.before_step()  # the per-step rule: BN of dead filters zeroed
    return model.eval()


@pytest.mark.parametrize(
    "name,extra", [("vgg11", {}), ("resnet20", {"shortcut": "A"}), ("resnet20", {"shortcut": "B"})]
)
def test_stripe_network_equals_masked_network(name, extra):
    model = calibrated_skeleton_model(name, 3, **extra)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    keep, scores = dead_filter_keep(model, alive_stripes(model, 0.01))
    pruned = break_into_stripes(prune_channels(model, keep), 0.01).eval()
    assert not any(isinstance(m, SkeletonConv) for m in pruned.modules())
    with torch.no_grad():
        out = pruned(x)
    assert (out - expected).abs().max() / expected.abs().max() <= 1e-4
    # rebuilt from its arch (a checkpoint's way), it is the same network
    rebuilt = build_model(pruned.arch)
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), out)
    if name.startswith("resnet"):
        assert pruned.layers[0][1].mid == 0 and pruned.layers[1][0].mid == 0  # reduced to their shortcuts
        assert not hasattr(pruned.layers[0][1], "conv1")
    # counted by hand: a stripe conv n * C_in weights at each output position, a conv or linear all its weights
    pixels = {}
    for m in pruned.modules():
        if isinstance(m, (StripeConv, torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(lambda m, i, o: pixels.__setitem__(m, o[0, 0].numel()))
    with torch.no_grad():
        pruned(x[:1])
    stripes = sum(len(m.positions) * m.in_channels * pixels[m] for m in pixels if isinstance(m, StripeConv))
    dense = sum(m.weight.numel() * pixels[m] for m in pixels if not isinstance(m, StripeConv))
    assert count_macs(pruned, (3, 16, 16)) == stripes + dense
    assert stripes < sum(mask.sum() for mask in alive_stripes(model, 0.01).values()) * 3 * 16 * 16


def test_refusals(compose, tmp_path):
    """The stripe stage without skeletons to break, in one line before anything runs."""
    from prune_cli.core.errors import UserError
    from prune_cli.run import pipeline

    with pytest.raises(UserError) as e:
        pipeline.run(compose("schedule=swp"), tmp_path / "a")  # regularizer none: no skeleton is trained
    assert e.value.option == "schedule.stages" and "regularizer=swp" in e.value.why
