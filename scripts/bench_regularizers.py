#!/usr/bin/env python
"""Cost of each regularizer in a training step: time(step with reg) / time(step with `none`).

ResNet-56 (CIFAR, 10 classes), synthetic 32x32 batches, SGD, CPU by default. Every regularizer is
built from its conf/regularizer/<name>.yaml (the shipped defaults). Measurements are interleaved
(one block of steps per regularizer per repeat, the order rotated every repeat) after a warm-up,
and the ratio is the median over repeats of (block time / the same repeat's `none` block time),
so slow drifts of the machine's load cancel. Also printed: the ratio of the fastest blocks
(min / min, the least load-sensitive estimate) and the regularizer's own work timed alone
(penalty forward + backward + after_step) as a fraction of a `none` step, i.e. the ratio it implies.

    python scripts/bench_regularizers.py [--batch 64] [--repeats 7] [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from prune_cli.importance.regularizers import REGULARIZERS, build_regularizer
from prune_cli.models import build_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "regularizer"
TARGET = 1.15


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median taken)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed block")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per regularizer first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--regularizers", nargs="+", default=list(REGULARIZERS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    names = ["none"] + [n for n in args.regularizers if n != "none"]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(dev)
    runs = {}
    for name in names:
        torch.manual_seed(0)
        model = build_model({"name": args.model, "num_classes": 10, "in_channels": 3}).to(dev).train()
        reg = build_regularizer(OmegaConf.load(CONF / f"{name}.yaml"), model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        runs[name] = (model, reg, opt)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def block(name: str, steps: int) -> float:
        model, reg, opt = runs[name]
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y) + reg.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            reg.after_step()
        sync()
        return (time.perf_counter() - t0) / steps

    for name in names:
        block(name, args.warmup)
    times = {n: [] for n in names}
    for r in range(args.repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(block(name, args.steps))

    # the regularizer's own work alone: penalty forward + backward + after_step (no model forward)
    pen = {}
    for name in names:
        model, reg, _ = runs[name]
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(3):
            reg.penalty()
        t = []
        for _ in range(20):
            sync()
            t0 = time.perf_counter()
            p = reg.penalty()
            if p.requires_grad:
                torch.autograd.grad(p, params, allow_unused=True)
            reg.after_step()
            sync()
            t.append(time.perf_counter() - t0)
        pen[name] = statistics.median(t)

    base = statistics.median(times["none"])
    base_min = min(times["none"])
    print(
        f"# {args.model}, batch {args.batch}, device {args.device}, threads {torch.get_num_threads()}, "
        f"{args.repeats} interleaved repeats x {args.steps} steps (median); none: {1000 * base:.1f} ms/step"
    )
    worst = 0.0
    for name in names:
        ratios = [t / t0 for t, t0 in zip(times[name], times["none"])]
        ratio = statistics.median(ratios)
        worst = max(worst, ratio)
        print(
            f"ratio_{name} = {ratio:.2f}    # median step {1000 * statistics.median(times[name]):.1f} ms, "
            f"per-repeat ratios {min(ratios):.2f}..{max(ratios):.2f}; min/min {min(times[name]) / base_min:.2f}; "
            f"regularizer alone {1000 * pen[name]:.2f} ms -> implied {1 + pen[name] / base_min:.3f}"
        )
    print(f"target: every ratio <= {TARGET:.2f}: {'PASS' if worst <= TARGET else 'FAIL'} (worst {worst:.2f})")


if __name__ == "__main__":
    main()
