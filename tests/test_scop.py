"""SCOP: residual-branch output pruning (masked == physical, counted by hand), the knockoff mixing, one factor step
against an explicit forward and Adam's first step, the score and per-layer rate by hand, and the refusals."""

import pytest
import torch
import torch.nn.functional as F

from helpers import calibrated
from prune_cli.core.errors import UserError
from prune_cli.methods.scop.stage import lowest_per_layer, mix, scop_scores, train_factors
from prune_cli.models import build_model
from prune_cli.structure.channels import mask_channels, prune_channels, structure
from prune_cli.structure.counting import count_macs, count_params


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_branch_output_pruning_is_exact_and_counted(shortcut):
    arch = {"name": "resnet20", "num_classes": 5, "in_channels": 3, "width_mult": 0.5, "shortcut": shortcut}
    model = calibrated(build_model({**arch, "prune_outputs": True}), (3, 16, 16))
    groups = model.channel_groups()
    assert [g.name for g in groups[:2]] == ["layers.0.0", "layers.0.0.out"]
    g = torch.Generator().manual_seed(2)
    keep = [torch.rand(w, generator=g) < 0.6 for w in model.widths]
    for k in keep:
        k[0] = True
    x = torch.randn(4, 3, 16, 16)
    mask_channels(model, keep)
    with torch.no_grad():
        expected = model(x)
    pruned = prune_channels(model, keep).eval()
    with torch.no_grad():
        out = pruned(x)
    assert (out - expected).abs().max() / expected.abs().max() <= 1e-4
    # pruning again composes the kept stream channels
    again = prune_channels(pruned, [torch.arange(w) % 2 == 0 for w in pruned.widths])
    assert again.arch["outputs"][0] == pruned.arch["outputs"][0][::2]
    # counting: the widths' count is the real model's, and conv_b costs |kept_a| x |kept_b| x 9 x H x W
    params, macs = structure(model, (3, 16, 16)).count([int(k.sum()) for k in keep])
    assert (params, macs) == (count_params(pruned), count_macs(pruned, (3, 16, 16)))
    dense = build_model({**arch, "prune_outputs": False})
    saved = count_macs(dense, (3, 16, 16)) - macs
    by_hand = 0
    for gi in range(0, len(keep), 2):
        name = groups[gi].name
        block = dense.get_submodule(name)
        hw = (16 >> int(name.split(".")[1])) ** 2  # stage s works at 16 / 2^s
        mid, cout = block.mid, block.cout
        ka, kb = int(keep[gi].sum()), int(keep[gi + 1].sum())
        by_hand += (mid - ka) * block.conv1.in_channels * 9 * hw + (mid * cout - ka * kb) * 9 * hw
    assert saved == by_hand


def test_mix_equals_the_formula():
    out = torch.randn(6, 4, 3, 3)
    beta = torch.tensor([0.0, 0.25, 0.5, 1.0])
    mixed = mix(out, beta)
    for n in range(3):
        for c in range(4):
            b = float(beta[c])
            assert torch.allclose(mixed[n, c], b * out[n, c] + (1 - b) * out[n + 3, c])
            assert torch.equal(mixed[n + 3, c], out[n + 3, c])


def test_one_factor_step_against_an_explicit_forward():
    """Frozen weights; the factor gradient of a hand-written mixed forward; Adam's first step moves each beta by
    lr * g / (|g| + eps), then clamps to [0, 1]."""
    torch.manual_seed(0)
    model = build_model({"name": "vgg11", "num_classes": 4, "in_channels": 3, "width_mult": 0.125})
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    fixed = torch.rand(8, 3, 16, 16) * 2 - 1  # the stand-in generator: always these knockoffs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convs = [model.features[i] for i in model._convs]
    # the independent forward: every conv's real half mixed with beta = 0.5 by hand, BN in training mode
    betas = [torch.full((c.out_channels,), 0.5, requires_grad=True) for c in convs]
    h, k = 0, 0
    h = torch.cat([x, fixed])
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in model.features:
        h = layer(h)
        if isinstance(layer, torch.nn.Conv2d):
            b = betas[k].view(1, -1, 1, 1)
            h = torch.cat([b * h[:8] + (1 - b) * h[8:], h[8:]])
            k += 1
    logits = model.classifier(model.pool(h).flatten(1))[:8]
    hand_loss = F.cross_entropy(logits, y)
    hand_loss.backward()
    model.load_state_dict(reference)  # the hand forward updated BN statistics; start from the same state
    learned, history = train_factors(model, lambda e: [(x, y)], lambda n: fixed[:n], epochs=1, lr=0.1)
    for beta, hand in zip(learned, betas):
        g = hand.grad  # Adam, first step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + 1e-8)
        assert torch.allclose(beta, (0.5 - 0.1 * g / (g.abs() + 1e-8)).clamp(0, 1), atol=1e-5)
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        assert torch.equal(after[key], value), key  # weights frozen
    assert not torch.equal(after["features.1.running_mean"], before["features.1.running_mean"])  # BN ran in train
    assert all(p.requires_grad for p in model.parameters())
    assert len(history) == 1 and history[0]["train_loss"] == pytest.approx(hand_loss.item(), rel=1e-5)


def test_scores_and_rate_by_hand():
    model = build_model({"name": "vgg11", "num_classes": 4, "in_channels": 3, "width_mult": 0.125})
    bn = model.features[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-2.0, 1.0, 0.5, 3.0, 1.0, 2.0, 0.1, 1.0]))
    betas = [torch.full((w,), 0.5) for w in model.widths]
    betas[0] = torch.tensor([1.0, 0.0, 0.75, 0.5, 0.9, 0.25, 1.0, 0.6])
    scores = scop_scores(model, betas)
    assert scores[0].tolist() == pytest.approx([2.0, -1.0, 0.25, 0.0, 0.8, -1.0, 0.1, 0.2])
    keep = lowest_per_layer(scores, 0.4)  # floor(0.4 * 8) = 3: the scores -1.0, -1.0, 0.0
    assert keep[0].tolist() == [True, False, True, False, True, False, True, True]
    assert all(int((~k).sum()) == int(0.4 * len(k)) for k in keep)


def test_refusals(compose, tmp_path):
    """No generator, a file that is not the generator, images the generator cannot match: one line each, before
    any data is read (the digits images are 1x8x8)."""
    import fakedata
    from prune_cli.run import pipeline

    with pytest.raises(UserError) as e:
        pipeline.run(compose("experiment=scop_resnet56_cifar10"), tmp_path / "a")
    assert e.value.option == "schedule.scop.generator_path" and "netG_cifar.pth" in e.value.why
    good = fakedata.make_knockoff_generator(tmp_path / "netG.pth")
    with pytest.raises(UserError) as e:
        pipeline.run(compose("schedule=scop", f"schedule.scop.generator_path={good}"), tmp_path / "b")
    assert e.value.option == "dataset.name" and "3x32x32" in e.value.why
    wrong = tmp_path / "wrong.pth"
    torch.save({"linear.weight": torch.zeros(3)}, wrong)
    cfg = compose(
        "schedule=scop", f"schedule.scop.generator_path={wrong}", "dataset=synthetic", "dataset.image_size=32"
    )
    with pytest.raises(UserError) as e:
        pipeline.run(cfg, tmp_path / "c")
    assert e.value.option == "schedule.scop.generator_path"


def test_bn_recalibration_is_one_training_pass():
    """Each batch moves the running statistics by the BN momentum towards the batch's own, as in training."""
    from prune_cli.methods.scop.stage import recalibrate_bn

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    model = torch.nn.Sequential(bn).eval()
    batches = [(torch.randn(4, 3, 5, 5) * 2 + 1, None), (torch.randn(4, 3, 5, 5) - 3, None)]
    mean, var = torch.zeros(3), torch.ones(3)
    for x, _ in batches:
        mean = 0.9 * mean + 0.1 * x.mean((0, 2, 3))
        var = 0.9 * var + 0.1 * x.var((0, 2, 3), unbiased=True)
    recalibrate_bn(model, batches)
    assert torch.allclose(bn.running_mean, mean, atol=1e-6) and torch.allclose(bn.running_var, var, atol=1e-6)
    assert not model.training  # the mode it came in
