"""Selection to a target: met within tolerance, minimum channels, protected layers, thresholds."""

from types import SimpleNamespace

import pytest
import torch

from prune_cli.models import build_model
from prune_cli.stages.prune import step_target
from prune_cli.structure.channels import prune_channels, structure
from prune_cli.structure.selection import Budget, select


def setup(name):
    model = build_model({"name": name, "num_classes": 10, "in_channels": 3})
    scores = [model.get_submodule(g.conv).weight.detach().abs().sum((1, 2, 3)) for g in model.channel_groups()]
    return model, structure(model, (3, 32, 32)), scores


def removed(model, st, keep, target):
    return Budget(st, model.widths, target).removed([int(k.sum()) for k in keep])


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16"])
@pytest.mark.parametrize("target", ["params", "macs", "channels"])
@pytest.mark.parametrize("scope,normalize", [("layer", "none"), ("global", "max")])
def test_target_met_within_tolerance(name, target, scope, normalize):
    model, st, scores = setup(name)
    budget = Budget(st, model.widths, target)
    # the finest step whole channels allow: the cheapest single channel's share of the target quantity
    step = min(budget.removed([w - (i == g) for i, w in enumerate(model.widths)]) for g in range(len(scores)))
    for ratio in (0.3, 0.5):
        keep = select(scores, st, target=target, ratio=ratio, scope=scope, normalize=normalize)
        error = abs(removed(model, st, keep, target) - ratio)
        assert error <= max(1e-3 * ratio, step)
        if step <= 1e-3 * ratio:  # where the granularity allows, the 0.1% relative target holds
            assert error <= 1e-3 * ratio


def test_global_lowest_scores_go_first():
    model, st, scores = setup("resnet20")
    keep = select(scores, st, target="channels", ratio=0.25, scope="global")
    floor = [torch.arange(len(s)) == s.argmax() for s in scores]  # min_channels=1 keeps each layer's best
    kept = torch.cat([s[k & ~f] for s, k, f in zip(scores, keep, floor)])
    dropped = torch.cat([s[~k] for s, k in zip(scores, keep)])
    assert dropped.max() <= kept.min()  # one global threshold
    assert sum(int((~k).sum()) for k in keep) == round(0.25 * sum(model.widths))


def test_layer_scope_same_share_everywhere():
    model, st, scores = setup("vgg16")
    keep = select(scores, st, target="channels", ratio=0.5, scope="layer")
    assert [int(k.sum()) for k in keep] == [w // 2 for w in model.widths]
    for s, k in zip(scores, keep):  # within a layer the weakest go
        assert s[~k].max() <= s[k].min()


def test_min_channels_and_protect():
    model, st, scores = setup("vgg11")
    last = len(scores) - 1
    keep = select(scores, st, target="params", ratio=0.9, scope="global", min_channels=4, protect={last})
    assert all(int(k.sum()) >= 4 for k in keep)
    assert bool(keep[last].all())


def test_threshold_removes_exactly_the_channels_below_it():
    model, st, scores = setup("resnet20")
    t = float(torch.cat(scores).median())
    keep = select(scores, st, target="channels", ratio=None, threshold=t)
    for s, k in zip(scores, keep):
        expect = s >= t
        if not expect.any():  # the floor keeps the best channel
            expect[s.argmax()] = True
        assert torch.equal(k, expect)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
def test_the_closest_reachable_amount_is_taken(scope, ratio):
    """Where whole channels cannot land within tolerance, the amount closest to the ratio wins, above it or below
    (a narrow ResNet-20 of 84 channels: 0.2 is 16.8 channels, so 17 go, not 16)."""
    model = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3, "width_mult": 0.25})
    st = structure(model, (3, 16, 16))
    scores = [model.get_submodule(g.conv).weight.detach().abs().sum((1, 2, 3)) for g in model.channel_groups()]
    keep = select(scores, st, target="channels", ratio=ratio, scope=scope)
    assert sum(int((~k).sum()) for k in keep) == round(ratio * sum(model.widths))


def prune_in_steps(name, width_mult, steps, ratio, target, scope, shape=(3, 8, 8)):
    """The removed share of the dense ``target`` after ``steps`` iterative steps as the prune stage takes them
    (step_target, the dense widths, the full search on the last step only), L1 scores, no finetuning."""
    p = SimpleNamespace(ratio=ratio, steps=steps, step_grid="linear", tolerance=1e-3)
    model = build_model({"name": name, "num_classes": 10, "in_channels": 3, "width_mult": width_mult})
    dense, dense_widths = Budget(structure(model, shape), model.widths, target).total, model.widths
    for step in range(1, steps + 1):
        st = structure(model, shape)
        step_ratio, tolerance = step_target(p, step, dense, Budget(st, model.widths, target).total)
        scores = [model.get_submodule(g.conv).weight.detach().abs().sum((1, 2, 3)) for g in model.channel_groups()]
        keep = select(
            scores,
            st,
            target=target,
            ratio=step_ratio,
            scope=scope,
            tolerance=tolerance,
            dense_widths=dense_widths,
            fill=step == steps,
        )
        model = prune_channels(model, keep)
    return 1 - Budget(structure(model, shape), model.widths, target).total / dense, model.widths


def test_many_iterative_steps_end_where_one_step_ends():
    """100 steps of layer scope end within tolerance, with the widths one step gives (each step ranks by the
    share of the dense layer gone, so the layers whose channels are cheapest are not drained first)."""
    removed, widths = prune_in_steps("resnet20", 0.5, 100, 0.5, "params", "layer")
    assert abs(removed - 0.5) <= 1e-3 * 0.5
    assert widths == prune_in_steps("resnet20", 0.5, 1, 0.5, "params", "layer")[1]
