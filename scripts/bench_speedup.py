"""Measured speed-up against MAC reduction: ResNet-56 and VGG-16 (CIFAR, 3x32x32, 10 classes) pruned to 50% of MACs.

Random weights (BN statistics as initialised), L1 scores, layer scope (every prunable layer loses the same share),
``selection.select`` to ``target=macs``, ``pruning.prune_channels``; then the dense and the pruned model timed
together by the runs' own timing function (``engine.latency.time_models``: eval mode, no_grad, warm-up, repeats
interleaved, medians). Prints, per model and batch size, the dense and pruned median latency (and interquartile
range), the measured speed-up, the MAC reduction factor (dense MACs / pruned MACs) and their ratio: 1 means the
wall clock falls as much as the MAC count. ``--residual``: the residual streams are pruned too (the traced
network's groups, ``prune.residual=true``). Usage:

    python scripts/bench_speedup.py [--models resnet56 vgg16] [--ratio 0.5] [--batch 1 64] [--threads N]
                                    [--repeats 21] [--warmup 3] [--residual]
"""

from __future__ import annotations

import argparse
import platform

import torch

from prune_cli.engine.latency import REPEATS, WARMUP, time_models
from prune_cli.importance.criteria import build_criterion
from prune_cli.models import build_model, with_shared_groups
from prune_cli.structure.channels import prune_channels, structure
from prune_cli.structure.counting import count_macs, count_params
from prune_cli.structure.selection import select

SHAPE = (3, 32, 32)


def pruned_pair(name: str, ratio: float, residual: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense, pruned to ``ratio`` of its MACs by L1 norm with the same share from every layer)."""
    torch.manual_seed(0)
    dense = build_model({"name": name, "num_classes": 10, "in_channels": 3}).eval()
    if residual:
        dense = with_shared_groups(dense, SHAPE)
    scores = build_criterion({"name": "l1", "granularity": "filter"}).scores(dense)
    keep = select(scores, structure(dense, SHAPE), target="macs", ratio=ratio, scope="layer")
    return dense, prune_channels(dense, keep).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16"])
    ap.add_argument("--ratio", type=float, default=0.5, help="share of the MACs removed")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--residual", action="store_true", help="prune the residual streams too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) on the CPU "
        f"({platform.processor() or platform.machine()}); {args.warmup} warm-up + {args.repeats} timed forwards "
        "per model and batch, interleaved; median (IQR) ms"
    )
    print(
        f"{'model':<9} {'batch':>5} {'dense ms':>15} {'pruned ms':>15} {'speed-up':>8} {'MACs /':>7} "
        f"{'speed-up / MACs':>15}"
    )
    for name in args.models:
        dense, pruned = pruned_pair(name, args.ratio, args.residual)
        macs_dense, macs_pruned = count_macs(dense, SHAPE), count_macs(pruned, SHAPE)
        factor = macs_dense / macs_pruned
        print(
            f"{name}: MACs {macs_dense / 1e6:.2f}M -> {macs_pruned / 1e6:.2f}M (/{factor:.2f}), params "
            f"{count_params(dense) / 1e6:.4f}M -> {count_params(pruned) / 1e6:.4f}M, widths "
            f"{dense.widths[:3]}... -> {pruned.widths[:3]}...",
            flush=True,
        )
        for b in args.batch:
            (d, d_iqr), (p, p_iqr) = time_models(
                [dense, pruned], SHAPE, b, "cpu", warmup=args.warmup, repeats=args.repeats
            )
            speedup = d / p
            print(
                f"{name:<9} {b:>5} {f'{d:.2f} ({d_iqr:.2f})':>15} {f'{p:.2f} ({p_iqr:.2f})':>15} {speedup:>8.2f} "
                f"{factor:>7.2f} {speedup / factor:>15.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
