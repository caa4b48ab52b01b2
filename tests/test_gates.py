"""Pruning from Scratch: gates, their loss, top-k bisection on MACs, gate training and epoch choice."""

import math

import pytest
import torch

from prune_cli.methods.pfs.gates import Gates, freeze_weights, select_epoch, train_gates
from prune_cli.methods.pfs.selection import select_top_gates
from prune_cli.models import build_model
from prune_cli.structure.channels import mask_channels, prune_channels, structure


def model_of(name, **kw):
    torch.manual_seed(0)
    return build_model({"name": name, "num_classes": 10, "in_channels": 3, **kw})


def reference_macs(name):
    ref = model_of(name)
    return structure(ref, (3, 32, 32)).count(ref.widths)[1]


# ------------------------------------------------------------------ gates and their loss


def test_gate_loss_value_and_gradient_by_hand():
    model = model_of("resnet20", widths=[2, 3, 1, 1, 1, 1, 1, 1, 1])
    gates = Gates(model)
    assert [p.numel() for p in gates.params] == [2, 3, 1, 1, 1, 1, 1, 1, 1] and gates.total == 12
    values = [torch.tensor([0.5, 1.0]), torch.tensor([0.0, 0.25, 0.75])] + [torch.tensor([0.5])] * 7
    gates.load_(values)
    # sum |g| = 1.5 + 1.0 + 7 * 0.5 = 6.0; density = 6 / 12 = 0.5
    assert gates.density() == pytest.approx(0.5)
    assert gates.nonzero_fraction() == pytest.approx(11 / 12)
    loss = gates.loss(target_density=0.2, lam=0.5)
    assert loss.item() == pytest.approx(0.5 * (0.5 - 0.2) ** 2)  # 0.045
    loss.backward()
    # d/dg = lam * 2 * (d - r) * sign(g) / C = 0.5 * 2 * 0.3 / 12 = 0.025; |g| has gradient 0 at g = 0
    assert torch.allclose(gates.params[0].grad, torch.tensor([0.025, 0.025]))
    assert torch.allclose(gates.params[1].grad, torch.tensor([0.0, 0.025, 0.025]))
    for p in gates.params[2:]:
        assert torch.allclose(p.grad, torch.tensor([0.025]))


def test_gates_are_not_model_parameters_and_clamp():
    model = model_of("vgg11")
    n_params = len(list(model.parameters()))
    gates = Gates(model, init=1.0)
    assert len(list(model.parameters())) == n_params
    assert not any("gate" in k for k in model.state_dict())
    assert [p.numel() for p in gates.params] == model.widths
    gates.params[0].data[:3] = torch.tensor([-0.5, 1.7, 0.3])
    gates.clamp_()
    assert gates.params[0][:3].tolist() == pytest.approx([0.0, 1.0, 0.3])


@pytest.mark.parametrize("name", ["resnet20", "vgg11"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_gate_zero_equals_mask_channels(name, mode):
    model = model_of(name)
    getattr(model, mode)()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(x)
    g = torch.Generator().manual_seed(2)
    keep = [torch.rand(w, generator=g) > 0.4 for w in model.widths]
    gates = Gates(model)
    gates.load_([k.float() for k in keep])
    with torch.no_grad():
        gated = model(x)
    gates.remove()
    with torch.no_grad():
        assert torch.equal(model(x), dense)  # removing the hooks restores the model
        mask_channels(model, keep)
        masked = model(x)
    assert not torch.allclose(gated, dense)
    assert torch.allclose(gated, masked, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ top-k bisection


def resnet_achievable_macs(model, st):
    """All MACs values a ResNet can reach: MACs are linear in the block widths (no products)."""
    n = len(model.widths)
    base = st.count([0] * n)[1]
    costs = [st.count([int(i == b) for i in range(n)])[1] - base for b in range(n)]
    reach = {0}
    for cost, w in zip(costs, model.widths):
        reach = {a + j * cost for a in reach for j in range(1, w + 1)}
    return sorted(base + r for r in reach)


@pytest.mark.parametrize("width_mult", [1.0, 1.25])
def test_bisection_resnet20_meets_target_whenever_reachable(width_mult):
    ref = reference_macs("resnet20")
    model = model_of("resnet20", width_mult=width_mult)
    st = structure(model, (3, 32, 32))
    reach = resnet_achievable_macs(model, st)
    g = torch.Generator().manual_seed(0)
    gates = [torch.rand(w, generator=g) for w in model.widths]
    n_met = 0
    for target in [0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8]:
        masks, info = select_top_gates(gates, st, ref, target)
        widths = [int(m.sum()) for m in masks]
        macs = st.count(widths)[1]
        assert info["macs"] == macs and info["widths"] == widths and info["k"] == sum(widths)
        assert info["reduction"] == pytest.approx(1 - macs / ref)
        assert min(widths) >= 1 and info["steps"] <= 30
        reachable = any(abs(m - ref * (1 - target)) <= 1e-3 * target * ref for m in reach)
        assert info["met"] == reachable, (target, info)
        assert info["out_of_order"] <= 3  # top-k up to a few channels swapped to hit the window
        if info["how"] == "topk":
            assert info["out_of_order"] == 0
        if info["met"]:
            n_met += 1
            assert abs(info["reduction"] - target) <= 1e-3 * target
        else:  # the lattice of reachable MACs is coarser than the window: report the closest
            assert min(abs(m - ref * (1 - target)) for m in reach) <= abs(macs - ref * (1 - target)) + 1
            assert abs(info["reduction"] - target) < 0.01
    assert n_met >= 7


@pytest.mark.parametrize("name,width_mult", [("vgg11", 1.0), ("vgg11", 1.25), ("resnet56", 1.25)])
def test_bisection_meets_target_within_0p1_percent(name, width_mult):
    ref = reference_macs(name)
    model = model_of(name, width_mult=width_mult)
    st = structure(model, (3, 32, 32))
    g = torch.Generator().manual_seed(1)
    gates = [torch.rand(w, generator=g) for w in model.widths]
    for target in [0.3, 0.5, 0.7]:
        masks, info = select_top_gates(gates, st, ref, target)
        assert info["met"], info
        assert abs(info["reduction"] - target) <= 1e-3 * target
        if name == "vgg11":  # the reduction is that of the physically pruned network vs the standard model
            pruned = prune_channels(model, masks)
            assert structure(pruned, (3, 32, 32)).count(pruned.widths)[1] == info["macs"]


def test_bisection_keeps_top_gates_and_min_channels():
    model = model_of("vgg11")
    st = structure(model, (3, 32, 32))
    ref = st.count(model.widths)[1]
    g = torch.Generator().manual_seed(3)
    gates = [torch.rand(w, generator=g) for w in model.widths]
    gates[2] = gates[2] * 0.01  # a whole layer of tiny gates: only min_channels survive there
    masks, info = select_top_gates(gates, st, ref, 0.5, min_channels=4)
    assert info["met"]
    assert int(masks[2].sum()) == 4
    assert set(torch.topk(gates[2], 4).indices.tolist()) == set(torch.nonzero(masks[2]).flatten().tolist())
    assert info["out_of_order"] <= 3
    if info["how"] == "topk":  # strict top-k among the channels not forced by min_channels
        flat = torch.cat(gates)
        kept = torch.cat(masks)
        forced = torch.zeros_like(kept)
        start = 0
        for v in gates:
            forced[start + torch.topk(v, 4).indices] = True
            start += len(v)
        free = ~forced
        assert flat[free & kept].min() >= flat[free & ~kept].max()


def test_bisection_unreachable_target_reports_not_met():
    model = model_of("resnet20")
    st = structure(model, (3, 32, 32))
    ref = st.count(model.widths)[1]
    gates = [torch.ones(w) for w in model.widths]
    masks, info = select_top_gates(gates, st, ref, 0.99)  # stem, conv2s and fc alone cost more
    assert not info["met"] and all(int(m.sum()) == 1 for m in masks)


# ------------------------------------------------------------------ gate training


def tiny_batches(n_batches=3, batch=8, seed=0, size=8):
    def fn(epoch):
        g = torch.Generator().manual_seed(seed + epoch)
        for _ in range(n_batches):
            yield torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)

    return fn


def test_select_epoch_scripted_history():
    hist = [
        dict(val_acc=0.50, density=0.30, nonzero=0.9),
        dict(val_acc=0.60, density=0.20, nonzero=0.5),
        dict(val_acc=0.70, density=0.25, nonzero=0.2),
        dict(val_acc=0.55, density=0.10, nonzero=0.1),
        dict(val_acc=0.60, density=0.15, nonzero=0.1),
    ]
    assert select_epoch(hist, 0.2) == (1, True)  # epoch 2 is better but too dense; tie 1 vs 4 -> earliest
    assert select_epoch(hist, 0.2, key="nonzero") == (2, True)
    assert select_epoch(hist, 1.0) == (2, True)
    assert select_epoch(hist, 0.05) == (4, False)  # none qualifies -> the last epoch


def test_train_gates_weights_fixed_gates_clamped_and_best_epoch_restored():
    model = model_of("resnet20")
    gates = Gates(model)
    params_before = {k: v.clone() for k, v in model.named_parameters()}
    bn_mean_before = model.layers[0][0].bn1.running_mean.clone()
    accs, snaps = iter([0.1, 0.9, 0.3]), []

    def val(m):
        snaps.append(gates.values())
        return next(accs)

    out = train_gates(model, gates, tiny_batches(), val, epochs=3, lr=0.05, lam=0.5, target_density=1.0)
    assert out["epoch"] == 1 and out["qualified"]
    assert [h["val_acc"] for h in out["history"]] == [0.1, 0.9, 0.3]
    for p, s in zip(gates.params, snaps[1]):
        assert torch.equal(p.detach(), s)
    assert not all(torch.equal(a, b) for a, b in zip(snaps[1], snaps[2]))  # the gates did move
    for p in gates.params:
        assert p.min() >= 0 and p.max() <= 1
    assert any(p.min().item() < 1 for p in gates.params)
    # PFS keeps the weights at init: parameters untouched; BN running stats (buffers) do update in train mode
    for k, v in model.named_parameters():
        assert torch.equal(v, params_before[k]), k
        assert not v.requires_grad
    assert not torch.equal(model.layers[0][0].bn1.running_mean, bn_mean_before)
    h = out["history"][0]
    assert h["reg"] > 0 and math.isclose(h["loss"], h["ce"] + h["reg"], rel_tol=1e-6)


def test_train_gates_no_qualifying_epoch_keeps_last():
    model = model_of("vgg11", widths=[8, 8, 8, 8, 8, 8, 8, 8])
    gates = Gates(model)
    snaps = []

    def val(m):
        snaps.append(gates.values())
        return 0.5

    out = train_gates(
        model, gates, tiny_batches(n_batches=2, size=32), val, epochs=2, lr=0.01, lam=0.5, target_density=0.0
    )
    assert out["epoch"] == 1 and not out["qualified"] and "no epoch" in out["note"]
    for p, s in zip(gates.params, snaps[-1]):
        assert torch.equal(p.detach(), s)


def test_regulariser_drives_density_down():
    model = model_of("resnet20", widths=[4] * 9)
    freeze_weights(model)
    gates = Gates(model)
    out = train_gates(
        model, gates, tiny_batches(n_batches=4), lambda m: 0.0, epochs=2, lr=0.05, lam=50.0, target_density=0.2
    )
    assert out["history"][0]["density"] < 0.9 and out["history"][-1]["density"] < 0.75
