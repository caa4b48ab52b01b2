#!/usr/bin/env python
"""Cost of filter grafting: ratio = time(N nets' epochs incl. grafting) / (N * time(1 net's epoch)).

N (default 2) ResNet-20s (CIFAR, 10 classes), synthetic CIFAR-shaped data (a fixed set of
`--steps` batches per epoch, each net in its own order), a plain SGD loop (lr 0.1, momentum 0.9,
wd 5e-4), CPU by default. Every round times one epoch of net 0 alone, then one epoch of each of
the N nets followed by `graft_ring` (external grafting, scope "all"), in alternating order; the
ratio is the median over rounds of (N-net time / (N x the same round's 1-net time)), so drifts of
the machine's load cancel; the ratio of the fastest rounds (min / min) is printed too.
It also times `graft_ring` alone (median of `--graft-calls` calls) and gives the overhead at
real-epoch length: 1 + t_graft / (N * t_epoch * 391 / steps) (391 = CIFAR batches of 128).
Target: ratio <= 1.05.

    python scripts/bench_grafting.py [--models 2] [--steps 10] [--batch 128] [--repeats 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from prune_cli.methods.grafting import graft_ring
from prune_cli.models import build_model

TARGET = 1.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--models", type=int, default=2, help="N networks grafted in a ring")
    ap.add_argument("--steps", type=int, default=10, help="training steps per (timed) epoch")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds (median taken)")
    ap.add_argument("--graft-calls", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    n = args.models

    g = torch.Generator().manual_seed(0)
    xs = torch.randn(args.steps, args.batch, 3, 32, 32, generator=g).to(dev)
    ys = torch.randint(0, 10, (args.steps, args.batch), generator=g).to(dev)
    nets, opts, orders = [], [], []
    for i in range(n):
        torch.manual_seed(i)
        net = build_model({"name": args.model, "num_classes": 10, "in_channels": 3}).to(dev).train()
        nets.append(net)
        opts.append(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4))
        orders.append(torch.randperm(args.steps, generator=torch.Generator().manual_seed(100 + i)).tolist())

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def epoch(i: int) -> None:
        net, opt = nets[i], opts[i]
        for s in orders[i]:
            loss = F.cross_entropy(net(xs[s]), ys[s])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    def all_epochs_and_graft() -> None:
        for i in range(n):
            epoch(i)
        graft_ring(nets)

    for i in range(n):  # warm-up (allocator, first-call overheads)
        epoch(i)
    graft_ring(nets)

    t1s, tns, ratios = [], [], []
    for r in range(args.repeats):
        if r % 2 == 0:  # alternate which comes first, so a load drift within a round cancels
            t1 = timed(lambda: epoch(0))
            tn = timed(all_epochs_and_graft)
        else:
            tn = timed(all_epochs_and_graft)
            t1 = timed(lambda: epoch(0))
        t1s.append(t1), tns.append(tn), ratios.append(tn / (n * t1))
        print(f"round {r}: 1 net {t1:.3f}s  {n} nets + graft {tn:.3f}s  ratio {tn / (n * t1):.4f}", flush=True)

    spare = [copy.deepcopy(net) for net in nets]
    tg = statistics.median(timed(lambda: graft_ring(spare)) for _ in range(args.graft_calls))
    t1 = statistics.median(t1s)
    ratio = statistics.median(ratios)
    print(
        f"model {args.model}, N={n}, {args.steps} steps x batch {args.batch}, device {dev}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"median epoch of 1 net: {t1:.3f}s; median {n} nets + grafting: {statistics.median(tns):.3f}s")
    print(f"graft_ring alone: {tg * 1e3:.2f} ms per call ({tg / (n * t1) * 100:.3f}% of {n} epochs here)")
    print(f"at real CIFAR epoch length (391 steps): ratio = {1 + tg / (n * t1 * 391 / args.steps):.5f}")
    print(
        f"ratio of the fastest rounds = min({n} nets + graft) / ({n} x min(1 net)) = "
        f"{min(tns) / (n * min(t1s)):.4f} (the least disturbed by other processes)"
    )
    print(f"ratio = {ratio:.4f}  (median over rounds; target <= {TARGET}: {'OK' if ratio <= TARGET else 'ABOVE'})")


if __name__ == "__main__":
    main()
