"""RMNet: the plain network equals the residual one (options A and B, BatchNorm kept or fused), its MACs are the
merged layers' (counted by hand), the factor rule against explicit loops, and pruning the factors' zeros is exact."""

import pytest
import torch

from helpers import calibrated
from prune_cli.core.errors import UserError
from prune_cli.importance.criteria import build_criterion
from prune_cli.methods.rmnet import ChannelFactors, block_statistics, rm_convert
from prune_cli.models import build_model
from prune_cli.models.layers import fold
from prune_cli.structure.channels import prune_channels
from prune_cli.structure.counting import count_macs


def calibrated_resnet(name, shortcut, seed=0):
    arch = {"name": name, "num_classes": 7, "in_channels": 3, "shortcut": shortcut, "width_mult": 0.5}
    return calibrated(build_model(arch), (3, 16, 16), seed)


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("fuse_bn", [False, True])
def test_plain_network_equals_residual_network(shortcut, fuse_bn):
    model = calibrated_resnet("resnet20", shortcut)
    stats = block_statistics(model, torch.randn(32, 3, 16, 16), 16)
    plain = rm_convert(model, fuse_bn, stats).eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules()) == (not fuse_bn)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        expected, out = model(x), plain(x)
    assert (out - expected).abs().max() / expected.abs().max() <= 1e-4
    rebuilt = build_model(plain.arch)  # a checkpoint's way back
    rebuilt.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), out)


def merged_macs_by_hand(blocks_per_stage, widths=(16, 32, 64), size=32, classes=10):
    """conv + linear MACs of the merged CIFAR ResNet: stem, then per block (C_in + mid) x C_in x 9 at the block's
    output size and C_out x (C_in + mid) x 9 at the same size, then the linear layer."""
    macs, cin, hw = 3 * widths[0] * 9 * size * size, widths[0], size
    for s, cout in enumerate(widths):
        for b in range(blocks_per_stage):
            if s > 0 and b == 0:
                hw //= 2
            macs += (cin + cout) * cin * 9 * hw * hw + cout * (cin + cout) * 9 * hw * hw
            cin = cout
    return macs + cin * classes


def test_merged_macs():
    for name, n, published in (("resnet20", 3, 77.12), ("resnet56", 9, 246.99)):
        plain = rm_convert(build_model({"name": name, "num_classes": 10, "in_channels": 3}))
        assert count_macs(plain, (3, 32, 32)) == merged_macs_by_hand(n)
        assert round(count_macs(plain, (3, 32, 32)) / 1e6, 2) == published  # docs/methods.md


def test_factor_rule_equals_explicit_loops():
    torch.manual_seed(0)
    plain = rm_convert(calibrated_resnet("resnet20", "A"))
    reg = ChannelFactors(plain, alpha=0.3, threshold=0.2)
    factor = plain.features[1].factor
    with torch.no_grad():
        factor.uniform_(-0.5, 0.5)
    factor.grad = torch.randn_like(factor)
    f0, g0 = factor.detach().clone(), factor.grad.clone()
    reg.before_step()
    for c in range(len(f0)):
        f, g = f0[c].item(), g0[c].item() + 0.3 * (1 if f0[c] > 0 else -1 if f0[c] < 0 else 0)
        if abs(f) <= 0.2:
            f, g = 0.0, 0.0
        assert factor[c].item() == pytest.approx(f)
        assert factor.grad[c].item() == pytest.approx(g, abs=1e-6)


def test_pruning_the_zero_factors_is_exact():
    torch.manual_seed(1)
    plain = rm_convert(calibrated_resnet("resnet20", "B"))
    ChannelFactors(plain, alpha=0.0, threshold=0.0)
    with torch.no_grad():
        for m in plain.modules():
            if hasattr(m, "factor"):
                m.factor.uniform_(0.5, 1.5).mul_(torch.rand_like(m.factor) < 0.6)
    plain.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = plain(x)
    fold(plain)
    assert "factors" not in plain.arch
    criterion = build_criterion({"name": "bn_scale", "rule": "nonzero", "bin_width": 0.01})
    scores = criterion.scores(plain)
    threshold = criterion.auto_threshold(scores)
    keep = [s >= threshold for s in scores]
    for k in keep:  # a layer whose factors all died keeps one (zero) channel
        k[0] |= not k.any()
    pruned = prune_channels(plain, keep).eval()
    assert sum(pruned.widths) < sum(plain.widths)
    with torch.no_grad():
        out = pruned(x)
    assert (out - expected).abs().max() / expected.abs().max() <= 1e-4


def test_a_criterion_that_needs_batchnorm_refuses_the_fused_form():
    plain = rm_convert(calibrated_resnet("resnet20", "A"), fuse_bn=True)
    with pytest.raises(UserError) as e:
        build_criterion({"name": "bn_scale", "rule": "ratio", "bin_width": 0.01}).scores(plain)
    assert e.value.option == "criterion.name"
    with pytest.raises(UserError) as e:
        ChannelFactors(plain, alpha=1e-4, threshold=0.01)
    assert e.value.option == "regularizer.name"


def test_rm_refuses_a_network_without_residual_blocks(compose, tmp_path):
    from prune_cli.run import pipeline

    with pytest.raises(UserError) as e:
        pipeline.run(compose("schedule=rmnet", "model=vgg11", "regularizer=factor_l1"), tmp_path)
    assert e.value.option == "schedule.stages" and "vgg11" in e.value.why
