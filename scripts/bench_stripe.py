"""CPU latency of a stripe-wise pruned network (SWP's stripe form) against the dense network and against the
channel-pruned dense network with the same filters, on random weights with a random share of stripes kept.

Two executions of the stripe form: ``shift`` (prune_cli's: one 1x1 conv over the kept stripes, shifted into place
by one index_add) and ``unfold`` (the official branch's grouped form: unfold the input into k*k groups of C
channels, one matmul per kernel position with its kept stripes, scatter-added), timed here to choose between
them. Prints milliseconds per batch (median of repeats) and ratios; above 1 means slower. Usage:

    python scripts/bench_stripe.py [--model vgg16] [--keep 0.3] [--batch 1 64] [--threads N] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prune_cli.methods.swp import FilterSkeleton, alive_stripes, break_into_stripes, dead_filter_keep
from prune_cli.models import build_model
from prune_cli.models.layers import SkeletonConv, StripeConv, fold
from prune_cli.structure.channels import prune_channels
from prune_cli.structure.counting import count_macs, count_params


def slices(conv: StripeConv) -> list[tuple[int, int, int, int]]:
    """(i, j, first stripe, end) per kernel position with stripes (they are stored by position)."""
    out, start = [], 0
    for ij in range(conv.k * conv.k):
        count = int(((conv._row * conv.k + conv._col) == ij).sum())
        if count:
            out.append((ij // conv.k, ij % conv.k, start, start + count))
            start += count
    return out


def unfold_forward(self, x):
    """The grouped (unfold) form of a StripeConv: the same output as its shift form."""
    k, s, p = self.k, self.stride, self.padding
    h, w = self.output_size(x.shape[2]), self.output_size(x.shape[3])
    cols = torch.nn.functional.unfold(x, k, padding=p, stride=s)  # (B, C*k*k, L), channel-major
    cols = cols.view(x.shape[0], self.in_channels, k * k, h * w)
    out = x.new_zeros(x.shape[0], self.out_channels, h * w)
    weight = self.weight.view(len(self.positions), self.in_channels)
    for i, j, a, b in slices(self):
        part = torch.matmul(weight[a:b], cols[:, :, i * k + j])  # (B, n_ij, L)
        out.index_add_(1, self.out_index[a:b], part)
    return out.view(x.shape[0], self.out_channels, h, w)


def latency_ms(model, x, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - tic)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vgg16")
    ap.add_argument("--keep", type=float, default=0.3, help="share of stripes kept (random; whole filters may die)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = {"name": args.model, "num_classes": 10, "in_channels": 3}
    dense = build_model(arch).eval()
    skeleton = build_model(arch)
    FilterSkeleton(skeleton, alpha=0.0, threshold=0.0, zero_dead_bn=True, init_gamma=None, init_linear_std=None)
    with torch.no_grad():
        for m in skeleton.modules():
            if isinstance(m, SkeletonConv):
                m.skeleton.copy_((torch.rand_like(m.skeleton) < args.keep).float())
                m.skeleton.flatten(1)[:, 4] = 1.0  # every filter keeps its centre stripe: no conv dies whole
    keep, _ = dead_filter_keep(skeleton, alive_stripes(skeleton, 0.0))
    channel_pruned = fold(prune_channels(skeleton, keep)).eval()
    stripe = break_into_stripes(prune_channels(skeleton, keep), 0.0).eval()
    shape = (3, 32, 32)
    print(
        f"{args.model}, {args.keep:.0%} of stripes kept, torch {torch.__version__}, {args.threads} thread(s); "
        f"MACs dense {count_macs(dense, shape) / 1e6:.2f}M, channel-pruned "
        f"{count_macs(channel_pruned, shape) / 1e6:.2f}M, stripe {count_macs(stripe, shape) / 1e6:.2f}M; params "
        f"{count_params(dense) / 1e6:.4f}M / {count_params(channel_pruned) / 1e6:.4f}M / "
        f"{count_params(stripe) / 1e6:.4f}M"
    )
    x = torch.randn(2, *shape)
    with torch.no_grad():
        shift_out = stripe(x)
        StripeConv.forward, shift_forward = unfold_forward, StripeConv.forward
        assert torch.allclose(stripe(x), shift_out, rtol=1e-4, atol=1e-4 * shift_out.abs().max().item())
        StripeConv.forward = shift_forward
    print(
        f"{'batch':>5} {'dense_ms':>9} {'chan_ms':>9} {'shift_ms':>9} {'unfold_ms':>9} {'shift/dense':>11} "
        f"{'shift/chan':>10} {'unfold/shift':>12}"
    )
    for b in args.batch:
        x = torch.randn(b, *shape)
        t_dense = latency_ms(dense, x, args.repeats)
        t_chan = latency_ms(channel_pruned, x, args.repeats)
        t_shift = latency_ms(stripe, x, args.repeats)
        StripeConv.forward = unfold_forward
        t_unfold = latency_ms(stripe, x, args.repeats)
        StripeConv.forward = shift_forward
        print(
            f"{b:>5} {t_dense:>9.2f} {t_chan:>9.2f} {t_shift:>9.2f} {t_unfold:>9.2f} {t_shift / t_dense:>11.2f} "
            f"{t_shift / t_chan:>10.2f} {t_unfold / t_shift:>12.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
