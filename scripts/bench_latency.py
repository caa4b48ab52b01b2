"""Pruning to a measured speed-up: ResNet-56, VGG-16 and torchvision mobilenet_v2 (random weights, CIFAR shape
3x32x32, 10 classes) pruned with ``prune.target=latency`` as the prune stage does it.

Per model and batch size: the cost model is built (``structure/cost_model.py``, into a fresh cache directory: its
build time), then built again from the cache (the reuse time). Then, in each of ``--runs`` runs: L1 scores over
every group of the traced graph (``prune.residual=true``); ``selection.select`` to ``target=latency`` with the
target speed-up's share (2.0x: 0.5 of the latency removed), its widths given back where faster
(``cost_model.widened``), aimed at the clock as the prune stage aims it
(``cost_model.aim``); then the dense and the pruned network timed together once more (``DeviceTimer.compare``:
15-300 interleaved forwards of each at that batch, on the cost model's setting, ``network_times``, more of them
until their ratio is known to 1%, four timings' worth at most) to judge the run. A run hits when its measured
speed-up is within ``--band`` (5%) of the target; a target beyond the fastest selection is said in one line.
Beside it: the same network pruned to half its MACs (``target=macs``), timed the same way. Usage:

    python scripts/bench_latency.py [--models resnet56 vgg16 mobilenet_v2] [--targets 64:2.0 1:1.5] [--runs 3]
                                    [--threads 2] [--round-to 1] [--scope layer] [--memory-format channels_last]
                                    [--cache DIR]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from prune_cli.importance.criteria import build_criterion
from prune_cli.models import build_model, with_shared_groups
from prune_cli.stages.latency_target import uniform
from prune_cli.structure import cost_model
from prune_cli.structure.channels import prune_channels, structure
from prune_cli.structure.counting import count_macs
from prune_cli.structure.selection import Budget, select

SHAPE = (3, 32, 32)
TORCHVISION = ("mobilenet_v2", "resnet18", "shufflenet_v2_x1_0", "efficientnet_b0")


def network(name: str):
    """The model as a run prunes it with ``prune.residual=true``: every group of its traced graph."""
    torch.manual_seed(0)
    if name in TORCHVISION:
        arch = {"name": "torchvision", "network": name, "num_classes": 10, "in_channels": 3}
    else:
        arch = {"name": name, "num_classes": 10, "in_channels": 3}
    return with_shared_groups(build_model(arch).eval(), SHAPE)


def build(model, batch: int, cache: str, layout: str, step: int):
    setting = cost_model.setting_of(model, batch, layout, quick=False)
    narrowed = lambda share: uniform(model, share)  # noqa: E731
    return cost_model.build(model, SHAPE, setting, narrowed, cost_model.Cache(cache), step=step)


def pruned(model, cost, target: str, ratio: float, round_to: int, scope: str):
    """(the model pruned by L1 scores to ``ratio`` of ``target``, the share of the latency the selection reached):
    latency priced by ``cost``, the widths then given back where faster, as the prune stage does."""
    st = structure(model, SHAPE)
    st.latency = cost_model.Predictor(cost, model, st)
    scores = build_criterion({"name": "l1", "granularity": "filter"}).scores(model)
    keep = select(scores, st, target=target, ratio=ratio, scope=scope, round_to=round_to)
    reached = Budget(st, model.widths, "latency").removed([int(k.sum()) for k in keep])
    if target == "latency":
        keep = cost_model.widened(keep, scores, lambda w: st.latency.ms(w, stairs=False), round_to)
    return prune_channels(model, keep).eval(), reached


def bench(name: str, batch: int, speedup: float, args) -> None:
    model = network(name)
    cache = args.cache or tempfile.mkdtemp(prefix="latency-cache-")
    cost = build(model, batch, cache, args.memory_format, args.round_to)
    tic = time.perf_counter()
    again = build(model, batch, cache, args.memory_format, args.round_to)
    reuse = time.perf_counter() - tic
    assert again.measured == 0, "the second build measured again"
    timer = cost_model.DeviceTimer(cost.setting)
    ratio = 1 - 1 / speedup

    def select_at(share):
        return pruned(model, again, "latency", share, args.round_to, args.scope)

    def time_pair(candidate):
        return timer.compare([model, candidate[0]], SHAPE)

    measured, reached, aims = [], None, []
    for _ in range(args.runs):  # each run aims anew (its own timings), then is timed once more to be judged
        (small, reached), asked, rounds = cost_model.aim(ratio, select_at, time_pair)
        dense_ms, small_ms = timer.compare([model, small], SHAPE)
        measured.append(dense_ms / small_ms)
        aims.append(f"{len(rounds)} ({asked:.3f})")
    half, _ = pruned(model, again, "macs", 0.5, args.round_to, args.scope)
    dense_ms, half_ms = timer.compare([model, half], SHAPE)
    inside = sum(abs(m / speedup - 1) <= args.band for m in measured)
    macs_gone = 1 - count_macs(small, SHAPE) / count_macs(model, SHAPE)
    print(
        f"{name:<13} {batch:>5} {speedup:>6.2f}x {' '.join(f'{m:.2f}x' for m in measured):>20} "
        f"{inside}/{len(measured)} within {args.band:.0%} {macs_gone:>7.1%}"
        f" {dense_ms / half_ms:>10.2f}x {cost.seconds:>8.1f} s {reuse:>7.2f} s"
    )
    if reached < asked * (1 - 1e-3):
        print(f"  out of reach: the fastest selection removes {reached:.3f} of the latency ({1 / (1 - reached):.2f}x)")
    print(
        f"  measured mean {statistics.mean(measured):.2f}x; selections timed per run (share asked): "
        f"{', '.join(aims)}; calibration a={cost.a:.2f} ms b={cost.b:.3f} over {len(cost.points)} networks"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16", "mobilenet_v2"])
    ap.add_argument("--targets", nargs="+", default=["64:2.0", "1:1.5"], help="batch:speed-up pairs")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--scope", default="layer", choices=["global", "layer"], help="prune.scope (its default: layer)")
    ap.add_argument("--band", type=float, default=0.05, help="relative error of the speed-up counted as a hit")
    ap.add_argument("--memory-format", default="channels_last", choices=["channels_last", "contiguous"])
    ap.add_argument("--cache", default=None, help="cost-model cache (default: a fresh directory per model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) on the CPU "
        f"({platform.processor() or platform.machine()}), {args.memory_format}; L1 scores, {args.scope} scope, "
        f"round_to {args.round_to}"
    )
    print(
        f"{'model':<13} {'batch':>5} {'target':>7} {'measured speed-ups':>20} {'hits':>15} {'MACs -':>7} "
        f"{'MACs/2 gives':>11} {'build':>10} {'reuse':>9}"
    )
    for name in args.models:
        for pair in args.targets:
            batch, speedup = pair.split(":")
            bench(name, int(batch), float(speedup), args)


if __name__ == "__main__":
    main()
