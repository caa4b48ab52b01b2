"""Channel gating: the gated conv against explicit loops (eval and batch statistics, both base-path masks, stride 1
and 2), the straight-through gradient by hand, the threshold loss and the weight decay it leaves out, the dynamic MAC
count against a hand count, the arch rebuild, a whole run and its resume, and the refusals."""

import math

import pytest
import torch

from helpers import TINY, run_interrupted
from prune_cli.core.errors import UserError
from prune_cli.methods.channel_gating import ChannelGating, GatedConv, ThresholdLoss, gated_convs
from prune_cli.models import build_model
from prune_cli.models.layers import convert
from prune_cli.run import pipeline
from prune_cli.structure.counting import count_macs, mean_dynamic_macs


def reads(o: int, i: int, cin: int, cout: int, p: int, group: bool) -> bool:
    """Whether the base path of filter o reads input channel i (the method's rule, written out)."""
    if group:
        return i // (cin // p) == o // (cout // p)
    return i < cin // p


def loops(x, w, stride, padding, p, group, mean, var, threshold, eps=1e-5):
    """Base sum, full sum and decision of every output element, one element at a time (float64)."""
    x, w = x.double(), w.double()
    n_img, cin, size, _ = x.shape
    cout, _, k, _ = w.shape
    padded = torch.zeros(n_img, cin, size + 2 * padding, size + 2 * padding, dtype=torch.float64)
    padded[:, :, padding : padding + size, padding : padding + size] = x
    out_size = (size + 2 * padding - k) // stride + 1
    base = torch.zeros(n_img, cout, out_size, out_size, dtype=torch.float64)
    full = torch.zeros_like(base)
    for n in range(n_img):
        for o in range(cout):
            for r in range(out_size):
                for c in range(out_size):
                    for i in range(cin):
                        patch = padded[n, i, r * stride : r * stride + k, c * stride : c * stride + k]
                        term = float((patch * w[o, i]).sum())
                        full[n, o, r, c] += term
                        if reads(o, i, cin, cout, p, group):
                            base[n, o, r, c] += term
    if mean is None:  # training: batch statistics of the base path (biased variance)
        mean, var = base.mean((0, 2, 3)), base.var((0, 2, 3), unbiased=False)
    normed = (base - mean.double().view(1, -1, 1, 1)) / torch.sqrt(var.double().view(1, -1, 1, 1) + eps)
    decision = normed > threshold.double().view(1, -1, 1, 1)
    return base, full, decision, normed


def gated(cin=4, cout=4, stride=1, p=2, group=False, sparse_bp=True, seed=0):
    torch.manual_seed(seed)
    conv = GatedConv(cin, cout, 3, stride, 1, p=p, group=group, alpha=2.0, sparse_bp=sparse_bp)
    with torch.no_grad():
        conv.threshold.uniform_(-0.5, 0.5)
        conv.norm.running_mean.uniform_(-0.3, 0.3)
        conv.norm.running_var.uniform_(0.5, 2.0)
    return conv


@pytest.mark.parametrize("stride,group,train", [(1, False, False), (2, True, False), (1, True, True)])
def test_gated_conv_equals_explicit_loops(stride, group, train):
    conv = gated(stride=stride, group=group).train(train)
    x = torch.randn(2, 4, 5, 5)
    bn = conv.norm
    stats = (None, None) if train else (bn.running_mean, bn.running_var)
    base, full, decision, _ = loops(x, conv.weight.detach(), stride, 1, 2, group, *stats, conv.threshold.detach())
    assert 0 < decision.double().mean() < 1  # both branches are exercised
    with torch.no_grad():
        out = conv(x)
    expected = torch.where(decision, full, base)
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("sparse_bp", [True, False])
def test_straight_through_gradient_by_hand(sparse_bp):
    """dL/dDelta_o = sum over o's elements of g * (full - base) * step'(z) * (-alpha * s * (1 - s)), with
    s = sigmoid(alpha * (BN(base) - Delta)), z = s - 0.5 and step'(z) = 1 (sparse: only where z >= 0)."""
    conv = gated(sparse_bp=sparse_bp).eval()
    x, g = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    (conv(x) * g).sum().backward()
    bn = conv.norm
    base, full, _, normed = loops(
        x, conv.weight.detach(), 1, 1, 2, False, bn.running_mean, bn.running_var, conv.threshold.detach()
    )
    for o in range(4):
        expected = 0.0
        for n in range(2):
            for r in range(5):
                for c in range(5):
                    s = 1 / (1 + math.exp(-2.0 * (float(normed[n, o, r, c]) - conv.threshold[o].item())))
                    passes = (s - 0.5 >= 0) or not sparse_bp
                    rest = float(full[n, o, r, c] - base[n, o, r, c])
                    expected += float(g[n, o, r, c]) * rest * passes * (-2.0 * s * (1 - s))
        assert conv.threshold.grad[o].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_threshold_loss_and_the_decay_it_leaves_out():
    arch = {"name": "resnet20", "num_classes": 3, "in_channels": 3, "width_mult": 0.25}
    model = build_model(arch)
    entry = {"p": 2, "group": False, "alpha": 2.0, "sparse_bp": True, "init": 0.0}
    convert(model, "gated", {n: entry for n in gated_convs(model, "original")})
    thresholds = [m.threshold for m in model.modules() if isinstance(m, GatedConv)]
    with torch.no_grad():
        for t in thresholds:
            t.uniform_(-1, 2)
    loss = ThresholdLoss(model, lam=0.3, target=0.6, weight_decay=0.01)
    by_hand = 0.3 * sum((v - 0.6) ** 2 for t in thresholds for v in t.tolist())
    assert loss.penalty().item() == pytest.approx(by_hand, rel=1e-5)
    grads = {name: torch.randn_like(q) for name, q in model.named_parameters()}
    for name, q in model.named_parameters():
        q.grad = grads[name].clone()
    loss.before_step()
    for name, q in model.named_parameters():
        decayed = q.dim() > 1  # conv and linear weights; not thresholds, BN parameters or biases
        assert torch.allclose(q.grad, grads[name] + 0.01 * q.detach() * decayed), name


def one_gated_conv_net(threshold):
    """A 4 -> 4 gated 3x3 conv (p 2) on 4x4 inputs, then a linear layer to 3 classes."""
    torch.manual_seed(0)
    conv = GatedConv(4, 4, 3, 1, 1, p=2, group=False, alpha=2.0, sparse_bp=True)
    with torch.no_grad():
        conv.threshold.copy_(torch.tensor(threshold))
    return torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(64, 3)).eval()


def test_dynamic_macs_equal_a_hand_count():
    # gates always on in channels 0 and 2, always off in 1 and 3
    net = one_gated_conv_net([-1e9, 1e9, -1e9, 1e9])
    batches = [(torch.randn(3, 4, 4, 4), None), (torch.randn(2, 4, 4, 4), None)]
    # base path: 4 filters x 2 inputs x 9 taps x 16 pixels = 1152; the two open channels add their other 2 inputs
    # at every pixel: 2 x 2 x 9 x 16 = 576; the linear layer 64 x 3 = 192
    assert mean_dynamic_macs(net, (4, 4, 4), batches) == 1152 + 576 + 192
    assert count_macs(net, (4, 4, 4)) == 4 * 4 * 9 * 16 + 192  # the static count: every gate open
    # gates that depend on the image: the mean over images of each one's open elements, counted from explicit loops
    net = one_gated_conv_net([0.3, -0.2, 0.1, 0.0])
    conv = net[0]
    counts = []
    for x, _ in batches:
        bn = conv.norm
        _, _, decision, _ = loops(
            x, conv.weight.detach(), 1, 1, 2, False, bn.running_mean, bn.running_var, conv.threshold.detach()
        )
        counts += [1152 + 2 * 9 * int(decision[n].sum()) + 192 for n in range(len(x))]
    assert 1152 + 192 < sum(counts) / 5 < 2496
    assert mean_dynamic_macs(net, (4, 4, 4), batches) == pytest.approx(sum(counts) / 5, rel=1e-12)
    assert conv.per_image_macs is None  # counting leaves nothing behind


def test_gated_convs_and_the_arch_rebuild():
    arch = {"name": "resnet20", "num_classes": 3, "in_channels": 3, "width_mult": 0.25}
    model = build_model(arch)
    original, post = gated_convs(model, "original"), gated_convs(model, "post_activated")
    assert original == [f"layers.{s}.{b}.conv1" for s in range(3) for b in range(3)]
    assert post == [f"layers.{s}.{b}.conv{k}" for s in range(3) for b in range(3) for k in (1, 2)]
    entry = {"p": 4, "group": True, "alpha": 2.0, "sparse_bp": True, "init": 0.0}
    convert(model, "gated", {n: entry for n in post})
    assert set(model.arch["gated"]) == set(post)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedConv):
                m.threshold.uniform_(-1, 1)
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 8, 8))
    rebuilt = build_model(model.arch)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


@pytest.mark.slow
def test_a_run_writes_dynamic_macs_and_resumes(compose, tmp_path, monkeypatch):
    cfg = compose(*TINY, "schedule=cg", "schedule.cg.epochs=2", "schedule.cg.p=2", "model.width_mult=0.25")
    rows = pipeline.run(cfg, tmp_path / "a")
    assert [r["stage"] for r in rows] == ["init", "cg"] and "dynamic_macs" not in rows[0]
    assert rows[1]["macs"] == rows[0]["macs"] and 0 < rows[1]["dynamic_macs"] < rows[1]["macs"]
    assert "| dynamic MACs (M) |" in (tmp_path / "a" / "summary.md").read_text()
    assert len(torch.load(tmp_path / "a" / "checkpoints" / "cg.pt", weights_only=True)["arch"]["gated"]) == 9
    # interrupted in its second epoch, the stage resumes from its epoch checkpoint to the same row
    run_interrupted(cfg, tmp_path / "b", monkeypatch, at_epoch=2)
    resumed = pipeline.run(cfg, tmp_path / "b")

    def untimed(r):
        return {k: None if v != v else v for k, v in r.items() if k != "seconds"}  # NaN as None

    assert [untimed(r) for r in resumed] == [untimed(r) for r in rows]


def test_refusals(compose, tmp_path):
    with pytest.raises(UserError) as e:  # a 16-channel conv cannot be split in 3
        pipeline.run(compose("schedule=cg", "schedule.cg.p=3"), tmp_path / "a")
    assert e.value.option == "schedule.cg.p" and "not a multiple of p=3" in e.value.why
    with pytest.raises(UserError) as e:  # nothing after it: the gated network is the result
        ChannelGating.check_config({"schedule": {"stages": ["cg", "finetune"], "cg": {"lr_schedule": "multistep"}}})
    assert e.value.option == "schedule.stages" and "finetune" in e.value.why
    with pytest.raises(UserError) as e:  # the group mask splits the outputs too: conv1 of a ResNet-20 at width 0.25
        pipeline.run(compose(*TINY, "schedule=cg", "model.width_mult=0.25", "schedule.cg.p=8"), tmp_path / "b")
    assert e.value.option == "schedule.cg.p" and "4 input channels" in e.value.why


def test_a_bad_option_is_one_line_before_any_data(command, tmp_path):
    r = command(
        "experiment=cg_resnet20_cifar10",
        "schedule.cg.p=1",
        f"dataset.root={tmp_path}/none",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: schedule.cg.p: must be an integer >= 2; got 1"]
